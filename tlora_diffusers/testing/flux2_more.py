"""Tiny FLUX.2 [klein] pipelines beyond text-to-image: KV-cached reference editing and inpainting.

Both pass ``t.expand(B).to(latents.dtype) / 1000`` (the transformer multiplies by 1000 again).
``Flux2KleinKVPipeline`` (distilled: no CFG) runs the reference-image tokens only in the first
step's transformer call (``kv_cache_mode="extract"``, at that step's ``t``, with the reference
tokens modulated at ``ref_fixed_timestep=0``), caches their per-layer K/V (LoRA layers
included, at that step's ranks) and reuses them in later steps (``kv_cache_mode="cached"``).
``Flux2KleinInpaintPipeline`` (undistilled: real CFG, a second call) starts at
``strength`` and appends the masked image's and any reference image's tokens to every call.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import TEXT_LEN, finish, flow_scheduler, flux2_vae, randn
from .flux2 import LORA_TARGETS, flux2_transformer

__all__ = ["CASES"]


def _build(pipeline: str):
    def build(seed: int) -> Any:
        import diffusers

        return finish(getattr(diffusers, pipeline)(
            transformer=seeded(seed, lambda: flux2_transformer(guidance_embeds=False)),
            vae=seeded(seed, flux2_vae), scheduler=flow_scheduler(dynamic=True), text_encoder=None, tokenizer=None,
        ))

    return build


def _pil(g: torch.Generator, size: int = 64):
    from PIL import Image

    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())


def _mask():
    from PIL import Image

    mask = torch.zeros(64, 64, dtype=torch.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask.numpy())


def _inputs(*, inpaint: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ref = next(pipe.transformer.parameters())
        dim = pipe.transformer.config.joint_attention_dim
        kwargs: dict[str, Any] = {
            "prompt_embeds": randn(g, 1, TEXT_LEN, dim, like=ref), "num_inference_steps": 2, "height": 64,
            "width": 64, "output_type": "latent", "generator": torch.Generator().manual_seed(seed),
        }
        if inpaint:  # 3 steps, strength 0.6: the last 2 run; CFG at guidance 4
            kwargs.update(negative_prompt_embeds=randn(g, 1, TEXT_LEN, dim, like=ref), image=_pil(g),
                          mask_image=_mask(), image_reference=_pil(g), strength=0.6, num_inference_steps=3,
                          guidance_scale=4.0)
        else:  # one reference image: its K/V are computed at step 0 and cached
            kwargs["image"] = [_pil(g)]
        return kwargs

    return inputs


CASES = [
    TinyCase("flux2-klein-kv", "flux2", "Flux2KleinKVPipeline", _build("Flux2KleinKVPipeline"),
             _inputs(inpaint=False), LORA_TARGETS),
    TinyCase("flux2-klein-inpaint", "flux2", "Flux2KleinInpaintPipeline", _build("Flux2KleinInpaintPipeline"),
             _inputs(inpaint=True), LORA_TARGETS),
]
