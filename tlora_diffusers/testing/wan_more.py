"""Tiny Wan-derived pipelines: VACE (Wan 2.1 and the two-expert Wan 2.2 VACE-Fun A14B), Animate and Lucy Edit.

* ``WanVACEPipeline``: ``WanVACETransformer3DModel`` is Wan's transformer plus ``vace_blocks.N``
  (same ``attn1/attn2/ffn`` names, plus ``proj_in/proj_out``) that run on the control latents
  (masked video latents + an 8x8-unshuffled mask: 16 + 16 + 64 = 96 channels) and add hints to
  the main blocks listed in ``vace_layers``. With ``transformer_2`` and ``boundary_ratio`` it
  switches experts like Wan 2.2 A14B (``transformer`` while ``t >= boundary_ratio * 1000``).
* ``WanAnimatePipeline``: ``WanAnimateTransformer3DModel`` is Wan 2.1 I2V's transformer plus a
  pose patch embedding, a motion encoder on the face video (``motion_encoder_size`` pixels square),
  a face encoder and ``face_adapter.N`` cross-attentions after every ``inject_face_latents_blocks``-th
  block; the latents carry one extra leading frame (the reference image).
* ``LucyEditPipeline``: a Wan 2.2 TI2V-5B ``WanTransformer3DModel`` (48-channel VAE, 16x spatial)
  fed the noise and the input video's latents side by side (96 channels); with
  ``expand_timesteps=True`` the timestep is passed per token, ``(B, seq)``, all equal to ``t``.

The VAEs, the flow UniPC scheduler and the CLIP vision tower are the tiny ones of ``testing/wan.py``;
prompts are passed as embeddings, so no T5 is built.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish
from .wan import _TEXT_CONTEXT, _TEXT_DIM, _clip_processor, _clip_vision, _image, _scheduler, _text, _transformer, \
    _vae21, _vae22

_INNER = 24  # 2 heads x 12: the smallest head width whose rotary split (t, h, w) is even
_IMAGE_DIM = 8  # CLIP vision hidden size stand-in (1280 in the checkpoints)
_FACE = 8  # face video size for the motion encoder (512 in the checkpoint)
# "proj_out" is left out: it also names the final output projection (and the VACE hint projections).
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


def _vace_transformer():
    from diffusers import WanVACETransformer3DModel

    return WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=_INNER // 2, in_channels=16,
        out_channels=16, text_dim=_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0, 1], vace_in_channels=16 + 16 + 64,
    )


def _animate_transformer():
    from diffusers import WanAnimateTransformer3DModel

    return WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=_INNER // 2, in_channels=16 + 4 + 16,
        latent_channels=16, out_channels=16, text_dim=_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", image_dim=_IMAGE_DIM, added_kv_proj_dim=_INNER,
        rope_max_seq_len=32, motion_encoder_channel_sizes={str(_FACE): 8, str(_FACE // 2): 8},
        motion_encoder_size=_FACE, motion_style_dim=16, motion_dim=4, motion_encoder_dim=16,
        face_encoder_hidden_dim=8, face_encoder_num_heads=2, inject_face_latents_blocks=1,
    )


def _build_vace(seed: int) -> Any:
    from diffusers import WanVACEPipeline

    return finish(WanVACEPipeline(
        tokenizer=None, text_encoder=None, vae=seeded(seed, _vae21), scheduler=_scheduler(3.0),
        transformer=seeded(seed, _vace_transformer),
    ))


def _build_vace_a14b(seed: int) -> Any:
    from diffusers import WanVACEPipeline

    # Two experts with different weights: `transformer` while t >= 875, `transformer_2` below.
    return finish(WanVACEPipeline(
        tokenizer=None, text_encoder=None, vae=seeded(seed, _vae21), scheduler=_scheduler(3.0),
        transformer=seeded(seed, _vace_transformer), transformer_2=seeded(seed + 1, _vace_transformer),
        boundary_ratio=0.875,
    ))


def _build_animate(seed: int) -> Any:
    from diffusers import WanAnimatePipeline

    return finish(WanAnimatePipeline(
        tokenizer=None, text_encoder=None, vae=seeded(seed, _vae21), scheduler=_scheduler(5.0),
        image_processor=_clip_processor(), image_encoder=seeded(seed, _clip_vision),
        transformer=seeded(seed, _animate_transformer),
    ))


def _build_lucy(expand_timesteps: bool):
    def build(seed: int) -> Any:
        from diffusers import LucyEditPipeline

        return finish(LucyEditPipeline(
            tokenizer=None, text_encoder=None, vae=seeded(seed, _vae22), scheduler=_scheduler(5.0),
            transformer=seeded(seed, lambda: _transformer(48 + 48, 48)), expand_timesteps=expand_timesteps,
        ))

    return build


def _embeds(pipe: Any, g: torch.Generator, context: int = TEXT_LEN) -> dict:
    denoiser = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    like = torch.empty(0, dtype=denoiser.dtype, device=denoiser.device)
    return dict(prompt_embeds=_text(g, like, context), negative_prompt_embeds=_text(g, like, context))


def _vace_inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(**_embeds(pipe, g), height=16, width=16, num_frames=5, num_inference_steps=2,
                output_type="latent", generator=torch.Generator().manual_seed(seed))


def _animate_inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    # One 5-frame segment: 2 latent frames after the reference frame. The pipeline's default
    # guidance_scale is 1 (no CFG); 2 runs the unconditional branch too (the face video blanked).
    return dict(image=_image(g, 16), pose_video=[_image(g, 16) for _ in range(5)],
                face_video=[_image(g, _FACE) for _ in range(5)], **_embeds(pipe, g, _TEXT_CONTEXT), height=16,
                width=16, segment_frame_length=5, num_inference_steps=2, guidance_scale=2.0, output_type="latent",
                generator=torch.Generator().manual_seed(seed))


def _lucy_inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(video=[_image(g, 32) for _ in range(9)], **_embeds(pipe, g), height=32, width=32, num_frames=9,
                num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(seed))


CASES = [
    TinyCase(
        name="wan-vace", family="wan-vace", pipeline="WanVACEPipeline", build=_build_vace, inputs=_vace_inputs,
        lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="wan2.2-vace-a14b", family="wan-vace", pipeline="WanVACEPipeline", build=_build_vace_a14b,
        inputs=_vace_inputs, lora_targets=_LORA_TARGETS, denoiser_attrs=("transformer", "transformer_2"),
    ),
    TinyCase(
        # The cross-attention splits the CLIP image tokens off at `len - 512`: text is padded to 512.
        name="wan-animate", family="wan-animate", pipeline="WanAnimatePipeline", build=_build_animate,
        inputs=_animate_inputs, lora_targets=_LORA_TARGETS + ("add_k_proj", "add_v_proj"),
    ),
    TinyCase(
        name="lucy-edit", family="wan", pipeline="LucyEditPipeline", build=_build_lucy(True), inputs=_lucy_inputs,
        lora_targets=_LORA_TARGETS, per_token=True,
    ),
    TinyCase(
        name="lucy-edit-scalar", family="wan", pipeline="LucyEditPipeline", build=_build_lucy(False),
        inputs=_lucy_inputs, lora_targets=_LORA_TARGETS,
    ),
]
