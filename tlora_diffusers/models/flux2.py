"""FLUX.2 [dev] and [klein]: the pipelines pass ``t / 1000``, as FLUX.1 does.

``pipeline_flux2_klein.py``: ``timestep = t.expand(latents.shape[0]).to(latents.dtype)``,
``self.transformer(..., timestep=timestep / 1000, ...)``; Klein's CFG is a second call
with the same timestep. ``_current_timestep = t`` is set in the loop.
"""

from __future__ import annotations

import torch

from ..training.recipe import Recipe
from . import ModelFamily, conventions
from .flux import flow_sigmas

__all__ = ["FAMILY"]


def _prompt(pipe, prompt: str) -> dict:
    embeds, text_ids = pipe.encode_prompt(prompt=prompt, device=pipe.transformer.device, max_sequence_length=128)
    return {"encoder_hidden_states": embeds, "txt_ids": text_ids}


def _images(pipe, images: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return pipe._encode_vae_image(images.to(pipe.vae.device, pipe.vae.dtype), generator=gen)  # mode, patchified


def _sample(pipe, latents: torch.Tensor, gen: torch.Generator, ctx: dict):
    B = latents.shape[0]
    img_ids = pipe._prepare_latent_ids(latents)
    packed = pipe._pack_latents(latents)
    noise = torch.randn(packed.shape, generator=gen)
    sigma = flow_sigmas(B, gen)
    noisy = (1 - sigma[:, None, None]) * packed + sigma[:, None, None] * noise
    t = sigma * 1000.0
    return {"hidden_states": noisy, "timestep": t / 1000.0, "img_ids": img_ids}, noise - packed, t


def _forward_kwargs(pipe, cond: dict, batch: dict) -> dict:
    B = batch["hidden_states"].shape[0]
    kw = dict(batch, encoder_hidden_states=cond["encoder_hidden_states"].expand(B, -1, -1),
              txt_ids=cond["txt_ids"].expand(B, -1, -1))
    kw["guidance"] = torch.full((B,), 4.0) if pipe.transformer.config.guidance_embeds else None
    return kw


FAMILY = ModelFamily(
    name="flux2",
    denoisers=("Flux2Transformer2DModel",),
    timestep_arg="timestep",
    convention=conventions.FRACTION,
    pipeline_attrs=("transformer",),
    pipelines=("Flux2Pipeline", "Flux2KleinPipeline"),
    # SimpleTuner's preset: Flux2Attention, Flux2FeedForward, Flux2ParallelSelfAttention.
    default_targets=(
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
        "ff_context.linear_out", "attn.to_qkv_mlp_proj", r"single_transformer_blocks.\d+.attn.to_out",
    ),
    recipes={"Flux2KleinPipeline": Recipe("transformer", _prompt, _images, _sample, _forward_kwargs,
                                          batch_keys=("hidden_states", "timestep", "img_ids"))},
)
