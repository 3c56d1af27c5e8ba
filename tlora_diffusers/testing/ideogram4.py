"""Tiny Ideogram 4 pipelines: ``Ideogram4Pipeline`` and the modular ``Ideogram4ModularPipeline``.

Ideogram 4 runs *asymmetric* CFG with two ``Ideogram4Transformer2DModel``s: ``transformer``
on the packed ``[left-pad][text][image]`` sequence and ``unconditional_transformer`` (its own
weights) on the image tokens alone with zeroed text features, each called once per step with
the same timestep. That timestep is model time ``1 - t / 1000`` (0 = noise, 1 = data), the
reverse of the scheduler's sigma convention; the blend ``gw * cond + (1 - gw) * uncond`` is
negated before ``scheduler.step``. Both keep the real module names
(``layers.N.attention.to_q/k/v/to_out.0``, ``layers.N.feed_forward.w1/w2/w3``).

``Ideogram4Pipeline`` accepts no prompt embeddings (``prompt`` is required), so it builds a
narrow 36-layer Qwen3-VL (the pipeline taps the hidden states of layers 0, 3, ..., 33, 35 and
concatenates them: 13 x 16 = 208 text features) with a 1-layer vision tower, and a byte-level
tokenizer whose chat template renders Qwen3-VL's content parts. The modular pipeline is built
from its auto blocks without the ``prompt_upsample``, ``text_encoder`` and ``decode`` blocks and
is fed the same kind of text features directly (``output="latents"``).
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import finish, flux2_vae, qwen_tokenizer, randn

_TEXT_DIM = 16  # Qwen3-VL-8B hidden size stand-in (4096)
_TEXT_LAYERS = 36  # the pipeline taps decoder layers up to 35
_TAPS = 13  # len(QWEN3_VL_ACTIVATION_LAYERS)
_LATENT = 4 * 4  # AutoencoderKLFlux2 latent channels (4 here) x 2x2 patch
_SIZE = 32  # pixels: 8x VAE, 2x2 patch -> a 2x2 token grid
_MAX_TEXT = 32  # max_sequence_length (2048 by default): the text region is left-padded to it
_TEXT_TOKENS = 12  # text length of the modular case's features
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
_GUIDANCE = [7.0, 3.0]  # the default schedule's two values, one per step
# Qwen3-VL's template for text-only content parts (the byte-level tokenizer's own template renders strings).
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _transformer():
    from diffusers import Ideogram4Transformer2DModel

    return Ideogram4Transformer2DModel(
        in_channels=_LATENT, num_layers=2, attention_head_dim=8, num_attention_heads=2, intermediate_size=32,
        adaln_dim=16, llm_features_dim=_TAPS * _TEXT_DIM, mrope_section=(2, 1, 1),
    )


def _tokenizer():
    tokenizer = qwen_tokenizer()
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def _text_encoder(vocab_size: int):
    from transformers import Qwen3VLConfig, Qwen3VLModel

    config = Qwen3VLConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": _TEXT_DIM, "intermediate_size": 2 * _TEXT_DIM,
            "num_hidden_layers": _TEXT_LAYERS, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 1, 1],
                                "mrope_interleaved": True},
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "patch_size": 8,
                       "out_hidden_size": _TEXT_DIM, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]},
    )
    return Qwen3VLModel(config)


def _scheduler():
    """The pipeline sets a logit-normal sigma schedule itself; the scheduler is a plain flow-matching Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def _build(seed: int) -> Any:
    from diffusers import Ideogram4Pipeline

    tokenizer = _tokenizer()
    return finish(Ideogram4Pipeline(
        scheduler=_scheduler(), vae=seeded(seed, flux2_vae), tokenizer=tokenizer,
        text_encoder=seeded(seed, lambda: _text_encoder(len(tokenizer))), transformer=seeded(seed, _transformer),
        unconditional_transformer=seeded(seed + 1, _transformer),  # its own weights, like the checkpoint's
    ))


def _quiet(blocks: Any) -> None:
    """``ModularPipeline.set_progress_bar_config`` only reaches top-level blocks; the loop is nested."""
    for block in getattr(blocks, "sub_blocks", {}).values():
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        _quiet(block)


def _build_modular(seed: int) -> Any:
    from diffusers import Ideogram4AutoBlocks, Ideogram4ModularPipeline

    blocks = Ideogram4AutoBlocks()
    for name in ("prompt_upsample", "text_encoder", "decode"):  # text features in, latents out
        blocks.sub_blocks.pop(name)
    pipe = Ideogram4ModularPipeline(blocks=blocks)
    pipe.update_components(transformer=seeded(seed, _transformer),
                           unconditional_transformer=seeded(seed + 1, _transformer), scheduler=_scheduler())
    _quiet(pipe._blocks)
    return finish(pipe)


def _inputs(pipe: Any, seed: int) -> dict:
    return dict(prompt="a fox", height=_SIZE, width=_SIZE, num_inference_steps=2,
                guidance_schedule=list(_GUIDANCE), max_sequence_length=_MAX_TEXT, output_type="latent",
                generator=torch.Generator().manual_seed(seed))


def _modular_inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    features = torch.zeros(1, _MAX_TEXT, _TAPS * _TEXT_DIM)  # left-padded, padding zeroed, float32 like the encoder's
    features[:, _MAX_TEXT - _TEXT_TOKENS:] = randn(g, 1, _TEXT_TOKENS, _TAPS * _TEXT_DIM)
    return dict(text_features=features.to(pipe.transformer.device), text_lengths=[_TEXT_TOKENS], height=_SIZE,
                width=_SIZE, num_inference_steps=2, guidance_schedule=list(_GUIDANCE),
                generator=torch.Generator().manual_seed(seed), output="latents")


_DENOISERS = ("transformer", "unconditional_transformer")

CASES = [
    TinyCase(
        name="ideogram4", family="ideogram4", pipeline="Ideogram4Pipeline", build=_build, inputs=_inputs,
        lora_targets=_LORA_TARGETS, denoiser_attrs=_DENOISERS,
    ),
    TinyCase(
        name="ideogram4-modular", family="ideogram4", pipeline="Ideogram4ModularPipeline", build=_build_modular,
        inputs=_modular_inputs, lora_targets=_LORA_TARGETS, denoiser_attrs=_DENOISERS,
    ),
]
