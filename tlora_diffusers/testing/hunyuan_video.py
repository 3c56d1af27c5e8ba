"""Tiny HunyuanVideo text-to-video pipeline.

The transformer keeps the real module names (double-stream ``transformer_blocks.N``,
single-stream ``single_transformer_blocks.N``, the ``context_embedder`` token refiner) and
the guidance embedding of the guidance-distilled checkpoint; the VAE is
``AutoencoderKLHunyuanVideo`` at its smallest width (8x spatial, 4x temporal); the
scheduler is the checkpoint's flow-matching Euler with ``shift=7``. Prompts are passed as
embeddings (Llama hidden states, their mask, the CLIP pooled vector): no text encoder is
built, and the default ``true_cfg_scale=1`` makes one call per step.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, randn

_TEXT_DIM = 16  # Llama hidden size stand-in (4096 in the checkpoint)
_POOLED_DIM = 8  # CLIP-L pooled size stand-in (768)
_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
)


def _transformer():
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=_TEXT_DIM, pooled_projection_dim=_POOLED_DIM, rope_axes_dim=(2, 4, 4),
    )


def _vae():
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True,
    )


def _build(seed: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    return finish(HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=seeded(seed, _transformer), vae=seeded(seed, _vae),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=7.0),
        text_encoder_2=None, tokenizer_2=None,
    ))


def _inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
    return dict(
        prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
        prompt_attention_mask=torch.ones(1, TEXT_LEN, dtype=torch.long, device=like.device),
        pooled_prompt_embeds=randn(g, 1, _POOLED_DIM, like=like),
        height=16, width=16, num_frames=5, num_inference_steps=2, output_type="latent",
        generator=torch.Generator().manual_seed(seed),
    )


CASES = [
    TinyCase(
        name="hunyuan-video", family="hunyuan-video", pipeline="HunyuanVideoPipeline", build=_build,
        inputs=_inputs, lora_targets=_LORA_TARGETS,
    ),
]
