"""Tiny LTX-Video pipelines: text-to-video and image-to-video (per-token timesteps).

The transformer keeps the real module names (``transformer_blocks.N.attn1/attn2/ff``);
the VAE is ``AutoencoderKLLTXVideo`` at its smallest width with the checkpoint's
compression (patch 4, three spatio-temporal downsamplings: 32x spatial, 8x temporal), so
a 32x32 frame is one latent token; the scheduler is the checkpoint's flow-matching Euler
with dynamic shifting and ``shift_terminal=0.1``. Prompts are passed as embeddings with
their attention masks (the pipelines run CFG in one doubled batch at the default
``guidance_scale=3``), so no T5 is built.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, randn

_TEXT_DIM = 32  # T5-XXL hidden size stand-in (4096 in the checkpoints)
_INNER = 16  # 2 heads x 8
_LATENT = 8  # latent channels (128 in the checkpoints)
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def _transformer():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(
        in_channels=_LATENT, out_channels=_LATENT, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=_INNER // 2, cross_attention_dim=_INNER, num_layers=2, caption_channels=_TEXT_DIM,
    )


def _vae():
    from diffusers import AutoencoderKLLTXVideo

    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=_LATENT, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False,
        patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return vae


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
        base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1,
    )


def _build(pipeline: str):
    def build(seed: int) -> Any:
        import diffusers

        cls = getattr(diffusers, pipeline)
        return finish(cls(
            scheduler=_scheduler(), vae=seeded(seed, _vae), text_encoder=None, tokenizer=None,
            transformer=seeded(seed, _transformer),
        ))

    return build


def _inputs(*, image: bool, frames: int):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        mask = torch.ones(1, TEXT_LEN, dtype=torch.long, device=like.device)
        kwargs = dict(
            prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like), prompt_attention_mask=mask,
            negative_prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
            negative_prompt_attention_mask=mask.clone(), height=32, width=32, num_frames=frames,
            num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(seed),
        )
        if image:
            kwargs["image"] = torch.rand(1, 3, 32, 32, generator=g)
        return kwargs

    return inputs


CASES = [
    TinyCase(
        name="ltx-video", family="ltx-video", pipeline="LTXPipeline", build=_build("LTXPipeline"),
        inputs=_inputs(image=False, frames=9), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        # 17 frames: 3 latent frames, the first one the conditioning image (timestep 0).
        name="ltx-video-i2v", family="ltx-video", pipeline="LTXImageToVideoPipeline",
        build=_build("LTXImageToVideoPipeline"), inputs=_inputs(image=True, frames=17),
        lora_targets=_LORA_TARGETS, per_token=True,
    ),
]
