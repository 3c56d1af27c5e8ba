"""Tiny FLUX.3 modular pipelines: ``Flux3ModularPipeline`` (CFG through the guider) and
``Flux3DistilledModularPipeline`` (flow map: no CFG, a second ``target_timestep`` per call).

FLUX.3 is modular only. The stock ``Flux3AutoBlocks`` / ``Flux3DistilledAutoBlocks`` are
used without their ``prompt_upsampler`` (a Qwen3.5 captioner), ``text_encoder`` (Qwen3-VL)
and ``decode`` steps: prompt embeddings go in, ``output="latents"`` comes back as
``(B, C, H/16, W/16)``. The scheduler (shift 6.93) and the ``ClassifierFreeGuidance``
guider (scale 3.5) are the blocks' own ``from_config`` defaults. The image-conditioned
cases pass one reference as ``image_cond_latents`` (what the VAE encoder step would
produce), which selects the ``image_conditioned`` core-denoise branch: the reference
tokens sit at timestep 0 inside the transformer.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, randn

__all__ = ["CASES", "LORA_TARGETS"]

_TEXT_DIM = 32  # stacked Qwen3-VL hidden states stand-in (20480 in the checkpoint)
_LATENT = 8  # packed latent channels (128 in the checkpoint)
#: Attention and SwiGLU feed-forward of the per-mode and single-stream blocks (not the modulations or proj_out).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.linear_in", "ff.linear_out")


def _transformer(flow_map: bool):
    from diffusers import Flux3Transformer2DModel

    return Flux3Transformer2DModel(
        in_channels=_LATENT, cond_in_channels=_LATENT, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=_TEXT_DIM, timestep_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), flow_map=flow_map,
    )


def _finish_modular(pipe: Any) -> Any:
    """``eval()`` every module and silence the progress bars of the (nested) denoising loops.

    ``ModularPipeline.set_progress_bar_config`` only reaches the top-level blocks, not the
    loop blocks nested inside the core-denoise steps, so walk the block tree.
    """
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


def _build(distilled: bool):
    def build(seed: int) -> Any:
        from diffusers import Flux3AutoBlocks, Flux3DistilledAutoBlocks

        blocks = Flux3DistilledAutoBlocks() if distilled else Flux3AutoBlocks()
        for name in ("prompt_upsampler", "text_encoder", "decode"):
            blocks.sub_blocks.pop(name)
        pipe = blocks.init_pipeline()  # Flux3ModularPipeline / Flux3DistilledModularPipeline
        pipe.update_components(transformer=seeded(seed, lambda: _transformer(flow_map=distilled)))
        return _finish_modular(pipe)

    return build


def _inputs(*, distilled: bool, reference: bool = False):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        kwargs = dict(
            prompt_embeds=randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like), height=32, width=32, num_inference_steps=2,
            generator=torch.Generator().manual_seed(seed), output="latents",
        )
        if not distilled:  # the guider runs CFG and needs the unconditional embeddings
            kwargs["negative_prompt_embeds"] = randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like)
        if reference:  # one 32x32 reference, as the VAE encoder step packs it: (B, C, H/16, W/16)
            kwargs["image_cond_latents"] = [randn(g, 1, _LATENT, 2, 2, like=like)]
        return kwargs

    return inputs


CASES = [
    TinyCase("flux3", "flux3", "Flux3ModularPipeline", _build(distilled=False), _inputs(distilled=False),
             LORA_TARGETS),
    TinyCase("flux3-reference", "flux3", "Flux3ModularPipeline", _build(distilled=False),
             _inputs(distilled=False, reference=True), LORA_TARGETS),
    TinyCase("flux3-distilled", "flux3", "Flux3DistilledModularPipeline", _build(distilled=True),
             _inputs(distilled=True), LORA_TARGETS),
    TinyCase("flux3-distilled-reference", "flux3", "Flux3DistilledModularPipeline", _build(distilled=True),
             _inputs(distilled=True, reference=True), LORA_TARGETS),
]
