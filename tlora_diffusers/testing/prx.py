"""Tiny PRX pipelines (``PRXTransformer2DModel``): latent ``PRXPipeline`` and pixel-space ``PRXPixelPipeline``.

Both pass the transformer ``t / num_train_timesteps`` in float32 with CFG in one doubled
batch (the timestep tensor is built as ``(1,)`` or ``(2,)`` whatever the batch size). The
pixel pipeline's transformer predicts x0, which the loop turns into a velocity before the
scheduler step. ``PRXTransformer2DModel`` has no ``PeftAdapterMixin`` (no ``add_adapter``):
LoRAs go in with ``peft.inject_adapter_in_model``. Its block modulations are zero-initialised
(identity blocks), so the tiny ones are re-drawn at random. Prompts are passed as embeddings with
masks, so no T5Gemma is built; resolution binning is off (it needs the VAE's image
processor) and the latent case has no VAE (``output_type="latent"``). The scheduler is a
plain flow-matching Euler.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, TEXT_LEN, finish, randn

__all__ = ["CASES", "LORA_TARGETS"]

_TEXT_DIM = 16  # T5Gemma hidden size stand-in (2304)
#: Image qkv / text kv projections, attention output and the SwiGLU MLP of every PRX block.
LORA_TARGETS = ("img_qkv_proj", "txt_kv_proj", "to_out.0", "gate_proj", "up_proj", "down_proj")


def _transformer(pixel: bool):
    from diffusers import PRXTransformer2DModel

    if pixel:  # RGB in, 4x4 pixel patches through a bottleneck projection
        model = PRXTransformer2DModel(
            in_channels=3, patch_size=4, context_in_dim=_TEXT_DIM, hidden_size=32, mlp_ratio=2.0, num_heads=2,
            depth=2, axes_dim=[8, 8], bottleneck_size=16,
        )
    else:
        model = PRXTransformer2DModel(
            in_channels=LATENT_CHANNELS, patch_size=2, context_in_dim=_TEXT_DIM, hidden_size=32, mlp_ratio=2.0,
            num_heads=2, depth=2, axes_dim=[8, 8],
        )
    # The blocks' modulations are zero-initialised (every gate 0: each block is the identity, so
    # nothing in it, a LoRA included, reaches the output); give them trained-like random weights.
    with torch.no_grad():
        for block in model.blocks:
            block.modulation.lin.weight.normal_(0.0, 0.1)
            block.modulation.lin.bias.normal_(0.0, 0.1)
    return model


def _build(pixel: bool):
    def build(seed: int) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline, PRXPixelPipeline

        transformer = seeded(seed, lambda: _transformer(pixel))
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
        if pixel:
            pipe = PRXPixelPipeline(transformer=transformer, scheduler=scheduler, text_encoder=None, tokenizer=None)
        else:
            pipe = PRXPipeline(transformer=transformer, scheduler=scheduler, text_encoder=None, tokenizer=None, vae=None)
        return finish(pipe)

    return build


def _inputs(*, pixel: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        mask = torch.ones(1, TEXT_LEN, dtype=torch.bool, device=like.device)
        return dict(
            prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
            negative_prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like), prompt_attention_mask=mask,
            negative_prompt_attention_mask=mask, height=16 if pixel else 32, width=16 if pixel else 32,
            num_inference_steps=2, use_resolution_binning=False, generator=torch.Generator().manual_seed(seed),
            output_type="pt" if pixel else "latent",
        )

    return inputs


CASES = [
    TinyCase("prx", "prx", "PRXPipeline", _build(pixel=False), _inputs(pixel=False), LORA_TARGETS),
    TinyCase("prx-pixel", "prx", "PRXPixelPipeline", _build(pixel=True), _inputs(pixel=True), LORA_TARGETS),
]
