"""FLUX.1 (text-to-image, img2img, inpaint, Kontext, Fill, ControlNet): the pipelines pass ``t / 1000``.

``pipeline_flux.py``: ``timestep = t.expand(latents.shape[0]).to(latents.dtype)`` then
``self.transformer(..., timestep=timestep / 1000, ...)``; the model multiplies by 1000
inside. ``_current_timestep = t`` is set in the loop. The ControlNet pipeline calls
``pipe.controlnet`` with the same ``timestep / 1000``.
"""

from __future__ import annotations

import torch

from ..training.recipe import Recipe
from . import ModelFamily, conventions

__all__ = ["FAMILY", "flow_sigmas"]


def flow_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform sigmas in (0, 1], as the diffusers DreamBooth flow scripts draw them (weighting 'none')."""
    return 1.0 - torch.rand(n, generator=gen)


def _prompt(pipe, prompt: str) -> dict:
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=pipe.transformer.device,
                                                  max_sequence_length=128)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}


def _images(pipe, images: torch.Tensor) -> torch.Tensor:
    dist = pipe.vae.encode(images.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1)


def _sample(pipe, moments: torch.Tensor, gen: torch.Generator, ctx: dict):
    mean, std = moments.chunk(2, dim=1)
    cfg = pipe.vae.config
    latents = ((mean + std * torch.randn(mean.shape, generator=gen)) - cfg.shift_factor) * cfg.scaling_factor
    B, C, H, W = latents.shape
    packed = pipe._pack_latents(latents, B, C, H, W)
    noise = torch.randn(packed.shape, generator=gen)
    sigma = flow_sigmas(B, gen)
    noisy = (1 - sigma[:, None, None]) * packed + sigma[:, None, None] * noise
    img_ids = pipe._prepare_latent_image_ids(B, H // 2, W // 2, packed.device, packed.dtype)
    t = sigma * 1000.0
    return {"hidden_states": noisy, "timestep": t / 1000.0, "img_ids": img_ids}, noise - packed, t


def _forward_kwargs(pipe, cond: dict, batch: dict) -> dict:
    B = batch["hidden_states"].shape[0]
    kw = dict(batch, encoder_hidden_states=cond["encoder_hidden_states"].expand(B, -1, -1),
              pooled_projections=cond["pooled_projections"].expand(B, -1), txt_ids=cond["txt_ids"])
    if pipe.transformer.config.guidance_embeds:
        kw["guidance"] = torch.full((B,), 3.5)
    return kw


FAMILY = ModelFamily(
    name="flux",
    denoisers=("FluxTransformer2DModel", "FluxControlNetModel", "FluxMultiControlNetModel"),
    timestep_arg="timestep",
    convention=conventions.FRACTION,
    pipeline_attrs=("transformer", "controlnet"),
    pipelines=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline",
               "FluxFillPipeline", "FluxControlNetPipeline"),
    default_targets=(
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    ),
    recipes={"FluxPipeline": Recipe("transformer", _prompt, _images, _sample, _forward_kwargs)},
)
