"""Per-model training recipes: how each pipeline encodes prompts and images and what its denoiser predicts.

Each recipe uses the pipeline's own helpers (``encode_prompt``, latent packing) so the
training inputs are exactly what the stock pipeline feeds its denoiser at inference.
Timesteps are drawn in scheduler units (what ``TLoRAPatch`` masks by).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Recipe", "recipe_for"]


# -- SDXL: DDPM noise, epsilon or v prediction -------------------------------------------------


def _sdxl_prompt(pipe, prompt: str) -> dict:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=pipe.unet.device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "text_embeds": pooled}


def _sdxl_images(pipe, images: torch.Tensor) -> torch.Tensor:
    dist = pipe.vae.encode(images.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1)  # sampled per step from these moments


def _sdxl_sample(pipe, moments: torch.Tensor, gen: torch.Generator, ctx: dict):
    if "ddpm" not in ctx:
        from diffusers import DDPMScheduler

        ctx["ddpm"] = DDPMScheduler.from_config(pipe.scheduler.config)
    sched = ctx["ddpm"]
    mean, std = moments.chunk(2, dim=1)
    latents = (mean + std * torch.randn(mean.shape, generator=gen)) * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    noisy = sched.add_noise(latents, noise, t)
    target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
    res = latents.shape[-1] * pipe.vae_scale_factor
    return {"sample": noisy, "timestep": t, "res": res}, target, t.float()


def _sdxl_forward_kwargs(pipe, cond: dict, batch: dict) -> dict:
    B = batch["sample"].shape[0]
    res = batch["res"]
    te2 = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else cond["text_embeds"].shape[-1]
    time_ids = pipe._get_add_time_ids((res, res), (0, 0), (res, res), dtype=cond["text_embeds"].dtype,
                                      text_encoder_projection_dim=te2)
    return dict(
        sample=batch["sample"], timestep=batch["timestep"],
        encoder_hidden_states=cond["encoder_hidden_states"].expand(B, -1, -1),
        added_cond_kwargs={"text_embeds": cond["text_embeds"].expand(B, -1), "time_ids": time_ids.expand(B, -1)},
    )


# -- Flux / Flux2: rectified flow, the transformer sees t / 1000 ------------------------------


def _flow_sigmas(pipe, n: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform sigmas in (0, 1], as the diffusers DreamBooth flow scripts draw them (weighting 'none')."""
    return 1.0 - torch.rand(n, generator=gen)


def _flux_prompt(pipe, prompt: str) -> dict:
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=pipe.transformer.device,
                                                  max_sequence_length=128)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}


def _flux_images(pipe, images: torch.Tensor) -> torch.Tensor:
    dist = pipe.vae.encode(images.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1)


def _flux_sample(pipe, moments: torch.Tensor, gen: torch.Generator, ctx: dict):
    mean, std = moments.chunk(2, dim=1)
    cfg = pipe.vae.config
    latents = ((mean + std * torch.randn(mean.shape, generator=gen)) - cfg.shift_factor) * cfg.scaling_factor
    B, C, H, W = latents.shape
    packed = pipe._pack_latents(latents, B, C, H, W)
    noise = torch.randn(packed.shape, generator=gen)
    sigma = _flow_sigmas(pipe, B, gen)
    noisy = (1 - sigma[:, None, None]) * packed + sigma[:, None, None] * noise
    img_ids = pipe._prepare_latent_image_ids(B, H // 2, W // 2, packed.device, packed.dtype)
    t = sigma * 1000.0
    return {"hidden_states": noisy, "timestep": t / 1000.0, "img_ids": img_ids}, noise - packed, t


def _flux_forward_kwargs(pipe, cond: dict, batch: dict) -> dict:
    B = batch["hidden_states"].shape[0]
    kw = dict(batch, encoder_hidden_states=cond["encoder_hidden_states"].expand(B, -1, -1),
              pooled_projections=cond["pooled_projections"].expand(B, -1), txt_ids=cond["txt_ids"])
    if pipe.transformer.config.guidance_embeds:
        kw["guidance"] = torch.full((B,), 3.5)
    return kw


def _flux2_prompt(pipe, prompt: str) -> dict:
    embeds, text_ids = pipe.encode_prompt(prompt=prompt, device=pipe.transformer.device, max_sequence_length=128)
    return {"encoder_hidden_states": embeds, "txt_ids": text_ids}


def _flux2_images(pipe, images: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return pipe._encode_vae_image(images.to(pipe.vae.device, pipe.vae.dtype), generator=gen)  # mode, patchified, normalised


def _flux2_sample(pipe, latents: torch.Tensor, gen: torch.Generator, ctx: dict):
    B = latents.shape[0]
    img_ids = pipe._prepare_latent_ids(latents)
    packed = pipe._pack_latents(latents)
    noise = torch.randn(packed.shape, generator=gen)
    sigma = _flow_sigmas(pipe, B, gen)
    noisy = (1 - sigma[:, None, None]) * packed + sigma[:, None, None] * noise
    t = sigma * 1000.0
    return {"hidden_states": noisy, "timestep": t / 1000.0, "img_ids": img_ids}, noise - packed, t


def _flux2_forward_kwargs(pipe, cond: dict, batch: dict) -> dict:
    B = batch["hidden_states"].shape[0]
    kw = dict(batch, encoder_hidden_states=cond["encoder_hidden_states"].expand(B, -1, -1), txt_ids=cond["txt_ids"].expand(B, -1, -1))
    kw["guidance"] = torch.full((B,), 4.0) if pipe.transformer.config.guidance_embeds else None
    return kw


_RECIPES = {
    "StableDiffusionXLPipeline": ("unet", _sdxl_prompt, _sdxl_images, _sdxl_sample, _sdxl_forward_kwargs),
    "FluxPipeline": ("transformer", _flux_prompt, _flux_images, _flux_sample, _flux_forward_kwargs),
    "Flux2KleinPipeline": ("transformer", _flux2_prompt, _flux2_images, _flux2_sample, _flux2_forward_kwargs),
}


@dataclass
class Recipe:
    """What the trainer needs from one pipeline family.

    ``sample(pipe, encoded_images, generator, ctx) -> (batch, target, timesteps)`` draws
    noise and timesteps (scheduler units); ``forward_kwargs(pipe, cond, batch)`` builds
    the denoiser's keyword arguments.
    """

    component: str
    encode_prompt: Callable
    encode_images: Callable
    sample: Callable
    forward_kwargs: Callable


def recipe_for(pipe) -> Recipe:
    name = type(pipe).__name__
    for cls in type(pipe).__mro__:
        if cls.__name__ in _RECIPES:
            return Recipe(*_RECIPES[cls.__name__])
    raise ValueError(
        f"training supports {', '.join(sorted(_RECIPES))}; got {name}. Pass a local folder of one of these pipelines"
    )
