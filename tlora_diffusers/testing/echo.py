"""Tiny Echo modular pipelines (``EchoModularPipeline``): LTX-2 audio+video DMD sampling, plain and with a
clean first frame plus image/audio memory slots.

Echo is modular only and has **no scheduler and no guider**: its loop walks a fixed DMD
sigma list (``sigmas``, default 8 steps ending at 0), calls the LTX-2 transformer once per
sigma, converts the velocity to x0 and re-noises it to the next sigma with fresh noise
from the generator. Timesteps are per token, ``sigma * timestep_scale_multiplier`` (1000)
for the noisy tokens and 0 for the clean first-frame and memory tokens; ``sigma`` /
``audio_sigma`` take the first video / audio token's value (0 with a first frame).

The stock ``EchoBlocks`` are used without ``text_encoder`` (Gemma + LTX-2 connectors),
``vae_encoder`` and ``decode``: the inputs are the connector outputs and, for the
conditioned case, the normalized VAE latents the encoder step would emit. Without VAEs the
pipeline falls back to the LTX-2 geometry (32x spatial, 8x temporal, 16 audio mel bins at
25 audio latents/s), so 32x32x9 frames is 2 video tokens and 9 audio tokens. The tiny
transformer is configured like LTX-2.3 (per-modality prompt-AdaLN on ``sigma``, gated
attention, connector-projected prompts); 2 sigmas, ``(1.0, 0.725, 0.0)``, give 2 calls.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, randn

__all__ = ["CASES", "LORA_TARGETS"]

_TEXT_DIM = 16  # connector output width = cross_attention_dim stand-in
_LATENT = 8  # video latent channels (128 in LTX-2)
_AUDIO_CHANNELS, _MEL_BINS = 2, 16  # audio latent channels stand-in (8) x the VAE-less mel-bin default (16)
_SIGMAS = (1.0, 0.725, 0.0)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj",
                "audio_ff.net.2")


def _transformer():
    from diffusers import LTX2VideoTransformer3DModel

    return LTX2VideoTransformer3DModel(
        in_channels=_LATENT, out_channels=_LATENT, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=_TEXT_DIM, audio_in_channels=_AUDIO_CHANNELS * _MEL_BINS,
        audio_out_channels=_AUDIO_CHANNELS * _MEL_BINS, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=_TEXT_DIM, num_layers=2, caption_channels=_TEXT_DIM, use_prompt_embeddings=False,
        cross_attn_mod=True, audio_cross_attn_mod=True, gated_attn=True, audio_gated_attn=True, ff_bias=False,
        audio_ff_bias=False,
    )


def _finish_modular(pipe: Any) -> Any:
    """``eval()`` every module and silence the progress bars of the nested denoising loops."""
    for value in pipe.components.values():
        if isinstance(value, torch.nn.Module):
            value.eval()
    stack = [pipe._blocks]
    while stack:
        block = stack.pop()
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        stack.extend(getattr(block, "sub_blocks", {}).values())
    return pipe


def _build(seed: int) -> Any:
    from diffusers import EchoBlocks

    blocks = EchoBlocks()
    for name in ("text_encoder", "vae_encoder", "decode"):
        blocks.sub_blocks.pop(name)
    pipe = blocks.init_pipeline()  # EchoModularPipeline
    pipe.update_components(transformer=seeded(seed, _transformer))
    return _finish_modular(pipe)


def _inputs(*, conditioned: bool = False):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        kwargs = dict(
            connector_prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
            connector_audio_prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
            connector_attention_mask=torch.ones(1, TEXT_LEN, dtype=torch.long),
            height=32, width=32, num_frames=9, sigmas=_SIGMAS, generator=torch.Generator().manual_seed(seed),
            output="latents",
        )
        if conditioned:  # normalized VAE latents: first frame (B, C, 1, h, w), one image slot, one audio slot
            kwargs.update(
                first_frame_latents=randn(g, 1, _LATENT, 1, 1, 1, like=like),
                memory_video_latents=[randn(g, 1, _LATENT, 1, 1, 1, like=like)],
                memory_audio_latents=[randn(g, 1, _AUDIO_CHANNELS, 3, _MEL_BINS, like=like)],
            )
        return kwargs

    return inputs


CASES = [
    TinyCase("echo", "ltx2", "EchoModularPipeline", _build, _inputs(), LORA_TARGETS, per_token=True),
    TinyCase("echo-first-frame-memory", "ltx2", "EchoModularPipeline", _build, _inputs(conditioned=True),
             LORA_TARGETS, per_token=True),
]
