"""Tiny FLUX.2 pipelines: [dev] (Mistral3 text encoder, guidance embedding) and [klein] (Qwen3, real CFG)."""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, TEXT_LEN, finish, flow_scheduler, flux2_vae, mistral3_encoder, \
    mistral_tokenizer, qwen3_encoder, qwen_tokenizer, randn

__all__ = ["CASES", "flux2_transformer", "build_flux2", "build_flux2_klein", "flux2_embeds", "LORA_TARGETS"]

LLM_DIM = 16  # Qwen3 (Klein) / Mistral (Flux2 dev) hidden size
TEXT_LAYERS = 3  # the Flux2 pipelines stack three hidden-state layers
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_qkv_mlp_proj")


def flux2_transformer(*, guidance_embeds: bool):
    """Flux2's transformer; its RoPE has 4 axes (time, height, width, text position)."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_LAYERS * LLM_DIM,
        timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    )


def build_flux2_klein(seed: int = 0, text_encoders: bool = False) -> Any:
    """FLUX.2 [klein] (base, undistilled): no guidance embedding, real CFG, Qwen3 text encoder."""
    from diffusers import Flux2KleinPipeline

    components: dict[str, Any] = {
        "transformer": seeded(seed, lambda: flux2_transformer(guidance_embeds=False)),
        "vae": seeded(seed, flux2_vae), "scheduler": flow_scheduler(dynamic=True),
        "text_encoder": None, "tokenizer": None,
    }
    if text_encoders:
        components.update(tokenizer=qwen_tokenizer(), text_encoder=seeded(seed, qwen3_encoder))
    return finish(Flux2KleinPipeline(**components))


def build_flux2(seed: int = 0, text_encoders: bool = False) -> Any:
    """FLUX.2 [dev]: guidance embedding (no CFG), Mistral3 text encoder, Mistral chat template."""
    from diffusers import Flux2Pipeline

    components: dict[str, Any] = {
        "transformer": seeded(seed, lambda: flux2_transformer(guidance_embeds=True)),
        "vae": seeded(seed, flux2_vae), "scheduler": flow_scheduler(dynamic=True),
        "text_encoder": None, "tokenizer": None,
    }
    if text_encoders:
        components.update(tokenizer=mistral_tokenizer(), text_encoder=seeded(seed, mistral3_encoder))
    return finish(Flux2Pipeline(**components))


def flux2_embeds(pipe: Any, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Stacked LLM hidden states; Klein runs real CFG at its default guidance 4.0, so it gets negatives."""
    dim = pipe.transformer.config.joint_attention_dim
    ref = next(pipe.transformer.parameters())
    gen = torch.Generator().manual_seed(seed)
    out = {"prompt_embeds": randn(gen, batch, TEXT_LEN, dim, like=ref)}
    if type(pipe).__name__.startswith("Flux2Klein"):
        out["negative_prompt_embeds"] = randn(gen, batch, TEXT_LEN, dim, like=ref)
    return out


def _inputs(pipe: Any, seed: int) -> dict[str, Any]:
    return {**flux2_embeds(pipe, seed=seed), "num_inference_steps": 2, "height": 64, "width": 64,
            "output_type": "latent", "generator": torch.Generator().manual_seed(seed)}


CASES = [
    TinyCase("flux2-klein", "flux2", "Flux2KleinPipeline", build_flux2_klein, _inputs, LORA_TARGETS),
    TinyCase("flux2", "flux2", "Flux2Pipeline", build_flux2, _inputs, LORA_TARGETS),
]
