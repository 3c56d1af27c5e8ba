"""Tiny ACE-Step 1.5 text-to-music pipeline (``AceStepTransformer1DModel``, audio latents).

The DiT keeps the real module names (``layers.N.self_attn/cross_attn.to_q/...``,
``layers.N.mlp.gate_proj/up_proj/down_proj``; alternating sliding-window / full self-attention) at
2 layers; the ``AceStepConditionEncoder`` (lyric and timbre encoders, learned null condition)
has one layer each; the text encoder is a 1-layer ``Qwen3Model`` over the byte-level Qwen
tokenizer of :mod:`._parts` (the pipeline only takes prompt *strings*: it formats them into
its SFT template, encodes the caption with the full text encoder and looks the lyrics up in its
input embeddings). The ``AutoencoderOobleck`` keeps the checkpoint's 48 kHz / 1920x
downsampling (25 latent frames per second) at width 4 and is never run (``output_type="latent"``).
The scheduler is the checkpoint's ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1,
shift=1)``: the pipeline computes its own shifted sigmas in ``[0, 1]`` and the DiT gets them as
``timestep`` *and* ``timestep_r`` (both ``(B,)``). The base (non-turbo) model runs APG guidance
(default 7) as one doubled ``[cond, null]`` batch.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import finish, qwen_tokenizer

_TEXT_DIM = 16  # Qwen3-Embedding-0.6B hidden size stand-in (1024)
_HIDDEN = 16  # DiT / condition width (2048)
_ACOUSTIC = 8  # VAE latent channels (64)
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "gate_proj", "up_proj", "down_proj")


def _attention(**extra) -> dict:
    return dict(intermediate_size=2 * _HIDDEN, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                sliding_window=4, **extra)


def _transformer():
    from diffusers import AceStepTransformer1DModel

    return AceStepTransformer1DModel(
        hidden_size=_HIDDEN, num_hidden_layers=2, in_channels=3 * _ACOUSTIC, audio_acoustic_hidden_dim=_ACOUSTIC,
        patch_size=2, **_attention(),
    )


def _condition_encoder():
    from diffusers.pipelines.ace_step import AceStepConditionEncoder

    return AceStepConditionEncoder(
        hidden_size=_HIDDEN, text_hidden_dim=_TEXT_DIM, timbre_hidden_dim=_ACOUSTIC, num_lyric_encoder_hidden_layers=1,
        num_timbre_encoder_hidden_layers=1, **_attention(),
    )


def _text_encoder():
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_tokenizer()
    return Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=_TEXT_DIM, intermediate_size=2 * _TEXT_DIM, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=_TEXT_DIM // 2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
    ))


def _vae():
    from diffusers import AutoencoderOobleck

    return AutoencoderOobleck(
        encoder_hidden_size=4, downsampling_ratios=[2, 4, 4, 6, 10], channel_multiples=[1, 1, 1, 1, 1],
        decoder_channels=4, decoder_input_channels=_ACOUSTIC, audio_channels=2, sampling_rate=48000,
    )


def _build(seed: int) -> Any:
    from diffusers import AceStepPipeline, FlowMatchEulerDiscreteScheduler

    return finish(AceStepPipeline(
        vae=seeded(seed, _vae), text_encoder=seeded(seed, _text_encoder), tokenizer=qwen_tokenizer(),
        transformer=seeded(seed, _transformer), condition_encoder=seeded(seed, _condition_encoder),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0),
    ))


def _inputs(pipe: Any, seed: int) -> dict:
    # 0.4 s at 25 latent frames/s: 10 latent frames, 5 tokens after patching.
    return dict(prompt="a tiny test song", lyrics="la la", audio_duration=0.4, num_inference_steps=2,
                output_type="latent", generator=torch.Generator().manual_seed(seed))


CASES = [TinyCase("ace-step", "ace-step", "AceStepPipeline", _build, _inputs, _LORA_TARGETS)]
