"""Stable Diffusion 1.x/2.x and SDXL: ``UNet2DConditionModel`` and ControlNets, in scheduler units.

Every UNet pipeline passes ``scheduler.timesteps`` entries unchanged, 0-d or ``(B,)``,
positionally or as ``timestep=`` (``pipeline_stable_diffusion_xl.py``: ``self.unet(latent_model_input, t, ...)``);
the ControlNet pipelines call ``pipe.controlnet`` with the same ``t``. None of them sets
``_current_timestep``; Euler-type schedulers set ``step_index`` in ``scale_model_input``,
before the UNet call. EDM schedulers (``EDMEulerScheduler``) pass ``0.25·log σ`` instead
and are refused.
"""

from __future__ import annotations

import torch

from ..training.recipe import Recipe
from . import ModelFamily, conventions

__all__ = ["FAMILY"]


def _sdxl_prompt(pipe, prompt: str) -> dict:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=pipe.unet.device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "text_embeds": pooled}


def _sd_prompt(pipe, prompt: str) -> dict:
    embeds, _ = pipe.encode_prompt(prompt, device=pipe.unet.device, num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds}


def _images(pipe, images: torch.Tensor) -> torch.Tensor:
    dist = pipe.vae.encode(images.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1)  # sampled per step from these moments


def _sample(pipe, moments: torch.Tensor, gen: torch.Generator, ctx: dict):
    """DDPM noise at uniform integer timesteps; epsilon or v-prediction targets, as the scheduler says."""
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


def _sd_forward_kwargs(pipe, cond: dict, batch: dict) -> dict:
    B = batch["sample"].shape[0]
    return dict(sample=batch["sample"], timestep=batch["timestep"],
                encoder_hidden_states=cond["encoder_hidden_states"].expand(B, -1, -1))


FAMILY = ModelFamily(
    name="stable-diffusion",
    denoisers=("UNet2DConditionModel", "ControlNetModel", "MultiControlNetModel", "ControlNetUnionModel",
               "MultiControlNetUnionModel"),
    timestep_arg="timestep",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("unet", "controlnet"),
    pipelines=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
               "StableDiffusionControlNetPipeline", "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
               "StableDiffusionXLInpaintPipeline", "StableDiffusionXLControlNetPipeline"),
    # SimpleTuner's LyCORIS T-LoRA preset: the Linear layers of Attention and FeedForward blocks.
    default_targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    recipes={
        "StableDiffusionXLPipeline": Recipe("unet", _sdxl_prompt, _images, _sample, _sdxl_forward_kwargs),
        "StableDiffusionPipeline": Recipe("unet", _sd_prompt, _images, _sample, _sd_forward_kwargs),
    },
)
