"""Tiny ERNIE-Image pipelines: ``ErnieImagePipeline`` and the modular ``ErnieImageModularPipeline``.

One ``ErnieImageTransformer2DModel`` (single stream ``[image | text]``, one shared AdaLN
modulation) keeps the real module names (``layers.N.self_attention.to_q/k/v/to_out.0``,
``layers.N.mlp.gate_proj/up_proj/linear_fc2``). It receives the raw scheduler timestep
``t`` (0-1000 scale, cast to the transformer dtype) through a sinusoidal ``Timesteps``
projection. The pipeline runs CFG in one doubled batch ``[uncond, cond]``; the modular one
through its guider, as two separate calls.

The model zero-initialises its shared ``adaLN_modulation`` output and ``final_linear`` (so a
fresh one predicts exactly zero and every block is gated off); the tiny builds re-draw those
two layers from a seeded normal so that the blocks, and a LoRA on them, reach the output.
Prompts are passed as per-prompt lists of ``(T, text_dim)`` hidden states (of different
lengths for the prompt and the negative prompt), so no Mistral3 is built; the modular pipeline
is built from its auto blocks without the ``prompt_enhancer``, ``text_encoder`` and ``decode``
blocks and returns the packed latents (``output="latents"``).
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import finish, flux2_vae, randn

_TEXT_DIM = 24  # Mistral3 hidden size stand-in; differs from the width (16) so `text_proj` exists, as in the checkpoint
_LATENT = 4 * 4  # AutoencoderKLFlux2 latent channels (4 here) x 2x2 patch
_SIZE = 32  # pixels: 16x (VAE 8x and the 2x2 patch) -> a 2x2 token grid
_TEXT_LEN, _NEG_LEN = 8, 4
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "mlp.gate_proj", "mlp.up_proj", "mlp.linear_fc2")


def _transformer():
    from diffusers import ErnieImageTransformer2DModel

    model = ErnieImageTransformer2DModel(
        hidden_size=16, num_attention_heads=2, num_layers=2, ffn_hidden_size=32, in_channels=_LATENT,
        out_channels=_LATENT, patch_size=1, text_in_dim=_TEXT_DIM, rope_axes_dim=(2, 2, 4),
    )
    with torch.no_grad():  # zero-initialised in the model; trained checkpoints are not
        for layer in (model.adaLN_modulation[-1], model.final_linear):
            torch.nn.init.normal_(layer.weight, std=0.2)
            torch.nn.init.normal_(layer.bias, std=0.2)
    return model


def _scheduler():
    """The pipeline passes a linear sigma grid; the scheduler is a plain flow-matching Euler (shift 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def _build(seed: int) -> Any:
    from diffusers import ErnieImagePipeline

    return finish(ErnieImagePipeline(
        transformer=seeded(seed, _transformer), vae=seeded(seed, flux2_vae), text_encoder=None, tokenizer=None,
        scheduler=_scheduler(),
    ))


def _quiet(blocks: Any) -> None:
    """``ModularPipeline.set_progress_bar_config`` only reaches top-level blocks; the loop is nested."""
    for block in getattr(blocks, "sub_blocks", {}).values():
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        _quiet(block)


def _build_modular(seed: int) -> Any:
    from diffusers import ErnieImageAutoBlocks, ErnieImageModularPipeline

    blocks = ErnieImageAutoBlocks()
    for name in ("prompt_enhancer", "text_encoder", "decode"):  # embeddings in, latents out
        blocks.sub_blocks.pop(name)
    pipe = ErnieImageModularPipeline(blocks=blocks)
    pipe.update_components(transformer=seeded(seed, _transformer), scheduler=_scheduler())
    _quiet(pipe._blocks)
    return finish(pipe)


def _embeds(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
    return dict(prompt_embeds=[randn(g, _TEXT_LEN, _TEXT_DIM, like=like)],
                negative_prompt_embeds=[randn(g, _NEG_LEN, _TEXT_DIM, like=like)],
                height=_SIZE, width=_SIZE, num_inference_steps=2, generator=torch.Generator().manual_seed(seed))


def _inputs(pipe: Any, seed: int) -> dict:
    return {**_embeds(pipe, seed), "guidance_scale": 4.0, "use_pe": False, "output_type": "latent"}


def _modular_inputs(pipe: Any, seed: int) -> dict:
    return {**_embeds(pipe, seed), "output": "latents"}


CASES = [
    TinyCase(
        name="ernie-image", family="ernie-image", pipeline="ErnieImagePipeline", build=_build, inputs=_inputs,
        lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="ernie-image-modular", family="ernie-image", pipeline="ErnieImageModularPipeline",
        build=_build_modular, inputs=_modular_inputs, lora_targets=_LORA_TARGETS,
    ),
]
