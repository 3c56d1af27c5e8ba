"""Tiny Mochi text-to-video pipeline.

The transformer keeps the real module names (``transformer_blocks.N.attn1`` with its text
stream ``add_*_proj``/``to_add_out``, ``ff``/``ff_context``; the last block is
``context_pre_only``); the VAE is ``AutoencoderKLMochi`` at its smallest width (8x spatial,
6x temporal); the scheduler is the checkpoint's flow-matching Euler with
``invert_sigmas=True`` (its ``timesteps`` run 0 -> ~1000 while the noise falls). Prompts
are passed as embeddings with masks, with negatives because the pipeline runs CFG in one
doubled batch at its default ``guidance_scale=4.5``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, randn

_TEXT_DIM = 32  # T5-XXL hidden size stand-in (4096 in the checkpoint)
_LORA_TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn1.add_q_proj", "attn1.add_k_proj",
    "attn1.add_v_proj", "attn1.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
    "ff_context.net.2",
)


def _transformer():
    from diffusers import MochiTransformer3DModel

    return MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=12, out_channels=None, qk_norm="rms_norm", text_embed_dim=_TEXT_DIM, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=TEXT_LEN,
    )


def _vae():
    from diffusers import AutoencoderKLMochi

    return AutoencoderKLMochi(
        latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
    )


def _build(seed: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

    return finish(MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, invert_sigmas=True),
        vae=seeded(seed, _vae), text_encoder=None, tokenizer=None, transformer=seeded(seed, _transformer),
    ))


def _inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
    mask = torch.ones(1, TEXT_LEN, dtype=torch.long, device=like.device)
    return dict(
        prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like), prompt_attention_mask=mask,
        negative_prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
        negative_prompt_attention_mask=mask.clone(), height=16, width=16, num_frames=7,
        num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(seed),
    )


CASES = [
    TinyCase(
        name="mochi", family="mochi", pipeline="MochiPipeline", build=_build, inputs=_inputs,
        lora_targets=_LORA_TARGETS,
    ),
]
