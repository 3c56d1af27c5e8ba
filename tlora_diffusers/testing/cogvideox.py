"""Tiny CogVideoX text-to-video pipeline (CogVideoX-2b layout).

The transformer keeps the real module names (``transformer_blocks.N.attn1`` over the
concatenated text + video tokens, ``ff``) with 3D sin-cos positions, as in CogVideoX-2b;
the VAE is ``AutoencoderKLCogVideoX`` at its smallest width (8x spatial, 4x temporal); the
scheduler is the checkpoint's ``CogVideoXDDIMScheduler`` (v-prediction, zero-terminal-SNR,
``snr_shift_scale=3``, trailing spacing: integer timesteps). Prompts are passed as
embeddings padded to the transformer's ``max_text_seq_length``, with negatives because the
pipeline runs CFG in one doubled batch at its default ``guidance_scale=6``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, randn

_TEXT_DIM = 32  # T5-XXL hidden size stand-in (4096 in the checkpoints)
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def _transformer():
    from diffusers import CogVideoXTransformer3DModel

    # 2 heads x 8 = 16: the 3D sin-cos positions need an inner width divisible by 16.
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=_TEXT_DIM, num_layers=2, sample_width=2, sample_height=2, sample_frames=5,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN,
    )


def _vae():
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )


def _scheduler():
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
        rescale_betas_zero_snr=True, snr_shift_scale=3.0, timestep_spacing="trailing",
    )


def _build(seed: int) -> Any:
    from diffusers import CogVideoXPipeline

    return finish(CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=seeded(seed, _vae), transformer=seeded(seed, _transformer),
        scheduler=_scheduler(),
    ))


def _inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
    return dict(
        prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
        negative_prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
        height=16, width=16, num_frames=5, num_inference_steps=2, output_type="latent",
        generator=torch.Generator().manual_seed(seed),
    )


CASES = [
    TinyCase(
        name="cogvideox", family="cogvideox", pipeline="CogVideoXPipeline", build=_build, inputs=_inputs,
        lora_targets=_LORA_TARGETS,
    ),
]
