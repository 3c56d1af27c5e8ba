"""Tiny SkyReels-V2 pipelines: text- and image-to-video, and the three diffusion-forcing pipelines
(text-, image- and video-to-video) that pass one timestep per latent frame.

``SkyReelsV2Transformer3DModel`` is Wan 2.1's transformer (same module names,
``blocks.N.attn1/attn2/ffn``) plus an fps embedding (``inject_sample_info``, on in the
diffusion-forcing checkpoints) and a per-frame timestep path: the diffusion-forcing pipelines
call it with ``timestep`` of shape ``(B, latent frames)`` and ``enable_diffusion_forcing=True``,
and the model repeats each frame's timestep over that frame's ``h*w`` tokens (tokens are
frame-major). Their cases set ``per_token=True`` although the argument is ``(B, frames)``, not
``(B, tokens)``: token ``n`` gets frame ``n // (h*w)``'s value. The diffusion-forcing pipelines keep
one deep copy of the scheduler per latent frame and step each frame with its own copy;
``pipe.scheduler`` itself is never stepped, and ``pipe.current_timestep`` is the whole per-frame row.

The VAE, the flow UniPC scheduler and the 2-layer CLIP vision tower (the I2V pipeline encodes its
conditioning image itself) are Wan 2.1's tiny ones (``testing/wan.py``); prompts are passed as
embeddings, so no T5 is built. The cases use 32x32 frames (2x2 tokens per latent frame) so that a
per-frame timestep differs from a per-token one.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish
from .wan import _TEXT_CONTEXT, _TEXT_DIM, _clip_processor, _clip_vision, _image, _scheduler, _text, _vae21

_INNER = 24  # 2 heads x 12: the smallest head width whose rotary split (t, h, w) is even
_IMAGE_DIM = 8  # CLIP vision hidden size stand-in (1280 in the I2V checkpoints)
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
_SIZE = 32  # 4x4 latents, 2x2 tokens per latent frame


def _transformer(in_channels: int, *, image: bool = False, forcing: bool = False):
    from diffusers import SkyReelsV2Transformer3DModel

    return SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=_INNER // 2, in_channels=in_channels,
        out_channels=16, text_dim=_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=_IMAGE_DIM if image else None,
        added_kv_proj_dim=_INNER if image else None, inject_sample_info=forcing,
    )


def _build(pipeline: str, *, in_channels: int = 16, image: bool = False, forcing: bool = False,
           flow_shift: float = 8.0):
    def build(seed: int) -> Any:
        import diffusers

        components: dict[str, Any] = dict(
            tokenizer=None, text_encoder=None, vae=seeded(seed, _vae21), scheduler=_scheduler(flow_shift),
            transformer=seeded(seed, lambda: _transformer(in_channels, image=image, forcing=forcing)),
        )
        if image:
            components.update(image_processor=_clip_processor(), image_encoder=seeded(seed, _clip_vision))
        return finish(getattr(diffusers, pipeline)(**components))

    return build


def _video(g: torch.Generator, frames: int) -> list:
    return [_image(g, _SIZE) for _ in range(frames)]


def _inputs(*, frames: int, image: bool = False, video: int = 0, context: int = TEXT_LEN, **extra):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        kwargs = dict(
            prompt_embeds=_text(g, like, context), negative_prompt_embeds=_text(g, like, context),
            height=_SIZE, width=_SIZE, num_frames=frames, num_inference_steps=2, output_type="latent",
            generator=torch.Generator().manual_seed(seed), **extra,
        )
        if image:
            kwargs["image"] = _image(g, _SIZE)
        if video:
            kwargs["video"] = _video(g, video)
        return kwargs

    return inputs


CASES = [
    TinyCase(
        name="skyreels-v2", family="skyreels-v2", pipeline="SkyReelsV2Pipeline",
        build=_build("SkyReelsV2Pipeline"), inputs=_inputs(frames=5), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        # The cross-attention splits the CLIP image tokens off at `len - 512`: text is padded to 512.
        name="skyreels-v2-i2v", family="skyreels-v2", pipeline="SkyReelsV2ImageToVideoPipeline",
        build=_build("SkyReelsV2ImageToVideoPipeline", in_channels=16 + 4 + 16, image=True, flow_shift=5.0),
        inputs=_inputs(frames=5, image=True, context=_TEXT_CONTEXT),
        lora_targets=_LORA_TARGETS + ("add_k_proj", "add_v_proj"),
    ),
    TinyCase(
        # `prompt` is a required argument here (None with embeddings). 3 latent frames,
        # asynchronous (ar_step=1): 4 iterations whose per-frame timesteps are
        # [t0, 999, 999], [t1, t0, 999], [0, t1, t0], [0, 0, t1] (999 = not started, 0 = done).
        name="skyreels-v2-df", family="skyreels-v2", pipeline="SkyReelsV2DiffusionForcingPipeline",
        build=_build("SkyReelsV2DiffusionForcingPipeline", forcing=True),
        inputs=_inputs(frames=9, prompt=None, ar_step=1), lora_targets=_LORA_TARGETS, per_token=True,
    ),
    TinyCase(
        # The image is latent frame 0 (clean, timestep 0); frames 1-2 are denoised in sync.
        name="skyreels-v2-df-i2v", family="skyreels-v2", pipeline="SkyReelsV2DiffusionForcingImageToVideoPipeline",
        build=_build("SkyReelsV2DiffusionForcingImageToVideoPipeline", forcing=True, flow_shift=5.0),
        inputs=_inputs(frames=9, image=True), lora_targets=_LORA_TARGETS, per_token=True,
    ),
    TinyCase(
        # A 5-frame input video: its last 5 frames are 2 clean prefix latent frames (timestep 0)
        # ahead of 2 generated ones; the output latents hold all 4.
        name="skyreels-v2-df-v2v", family="skyreels-v2",
        pipeline="SkyReelsV2DiffusionForcingVideoToVideoPipeline",
        build=_build("SkyReelsV2DiffusionForcingVideoToVideoPipeline", forcing=True),
        inputs=_inputs(frames=13, video=5, overlap_history=5), lora_targets=_LORA_TARGETS,
        per_token=True,
    ),
]
