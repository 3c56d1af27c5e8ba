"""Tiny Krea 2 pipelines: ``Krea2Pipeline`` and the modular ``Krea2ModularPipeline`` / ``Krea2TurboModularPipeline``.

One ``Krea2Transformer2DModel`` (single-stream MMDiT with grouped-query attention, a sigmoid
output gate, SwiGLU feed-forwards and a small text-fusion transformer of its own) keeps the
real module names (``transformer_blocks.N.attn/ff``, ``text_fusion.*_blocks.N.attn/ff``). The
timestep it receives is ``t / 1000`` (flow time in ``[0, 1]``); the base pipeline runs CFG as
two separate calls (cond, then negative), the turbo (distilled) modular pipeline runs one call
per step and receives no extra timestep-like argument.

Prompts are passed as the stacked per-layer text features the Qwen3-VL tap would produce
(``(B, L, num_text_layers, text_dim)`` plus a boolean mask), so no text encoder is built; the
modular pipelines are built from their auto blocks with the ``text_encoder`` and ``decode``
blocks removed (the modular way to feed embeddings) and return the unpacked latents
(``output="latents"``). The VAE is ``AutoencoderKLQwenImage`` at 8x like the checkpoint's (only
its ``temperal_downsample`` is read when ``output_type="latent"``).
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import finish, randn

_Z_DIM = 4  # VAE latent channels; the transformer sees 2x2-packed latents (4 * z_dim)
_TEXT_DIM = 16  # Qwen3-VL hidden size stand-in (2560 in the checkpoint)
_TEXT_LAYERS = 3  # tapped text-encoder layers (12 in the checkpoint)
_TEXT_LEN = 8
_PADDED = 2  # trailing text positions marked invalid in the mask (the real layout is fixed-length, padded)
_SIZE = 32  # pixels: 8x VAE, 2x2 patches -> a 2x2 token grid
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_gate", "to_out.0", "ff.gate", "ff.up", "ff.down")


def _transformer():
    from diffusers import Krea2Transformer2DModel

    return Krea2Transformer2DModel(
        in_channels=4 * _Z_DIM, num_layers=2, attention_head_dim=8, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=_TEXT_DIM, num_text_layers=_TEXT_LAYERS,
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(2, 2, 4),
    )


def _vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=2, z_dim=_Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=0, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * _Z_DIM, latents_std=[1.0] * _Z_DIM,
    )


def _scheduler():
    """The Krea 2 scheduler: dynamic (resolution-aware, exponential) shift; ``mu`` is computed by the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=6400, time_shift_type="exponential",
    )


def _build(seed: int) -> Any:
    from diffusers import Krea2Pipeline

    return finish(Krea2Pipeline(
        scheduler=_scheduler(), vae=seeded(seed, _vae), text_encoder=None, tokenizer=None,
        transformer=seeded(seed, _transformer), text_encoder_select_layers=tuple(range(1, _TEXT_LAYERS + 1)),
    ))


def _quiet(blocks: Any) -> None:
    """``ModularPipeline.set_progress_bar_config`` only reaches top-level blocks; the loop is nested."""
    for block in getattr(blocks, "sub_blocks", {}).values():
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        _quiet(block)


def _build_modular(pipeline: str):
    def build(seed: int) -> Any:
        import diffusers

        cls = getattr(diffusers, pipeline)
        blocks = getattr(diffusers, cls.default_blocks_name)()
        for name in ("text_encoder", "decode"):  # embeddings in, latents out
            blocks.sub_blocks.pop(name)
        pipe = cls(blocks=blocks)
        pipe.update_components(transformer=seeded(seed, _transformer), scheduler=_scheduler())
        _quiet(pipe._blocks)
        return finish(pipe)

    return build


def _text(g: torch.Generator, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = randn(g, 1, _TEXT_LEN, _TEXT_LAYERS, _TEXT_DIM, like=like)
    mask = torch.ones(1, _TEXT_LEN, dtype=torch.bool, device=like.device)
    mask[:, _TEXT_LEN - _PADDED:] = False
    return embeds, mask


def _inputs(*, negative: bool, modular: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        embeds, mask = _text(g, like)
        kwargs = dict(prompt_embeds=embeds, prompt_embeds_mask=mask, height=_SIZE, width=_SIZE,
                      num_inference_steps=2, generator=torch.Generator().manual_seed(seed))
        if negative:  # CFG: a second, separate transformer call on the negative features
            kwargs["negative_prompt_embeds"], kwargs["negative_prompt_embeds_mask"] = _text(g, like)
        if modular:
            kwargs["output"] = "latents"
        else:
            kwargs["output_type"] = "latent"
        return kwargs

    return inputs


CASES = [
    TinyCase(
        name="krea2", family="krea2", pipeline="Krea2Pipeline", build=_build,
        inputs=_inputs(negative=True, modular=False), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="krea2-modular", family="krea2", pipeline="Krea2ModularPipeline",
        build=_build_modular("Krea2ModularPipeline"), inputs=_inputs(negative=True, modular=True),
        lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="krea2-turbo-modular", family="krea2", pipeline="Krea2TurboModularPipeline",
        build=_build_modular("Krea2TurboModularPipeline"), inputs=_inputs(negative=False, modular=True),
        lora_targets=_LORA_TARGETS,
    ),
]
