"""Tiny Stable Diffusion 3 / 3.5 pipeline."""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, TEXT_LEN, clip_text_model, clip_tokenizer, finish, flow_scheduler, randn, \
    t5_encoder, t5_tokenizer, vae

__all__ = ["CASES", "sd3_transformer", "build_sd3", "sd3_embeds", "LORA_TARGETS"]

T5_DIM = 64
SD3_TE1 = 16  # CLIP-L stand-in; SD3 pools both CLIPs and pads their concat to T5 width
SD3_TE2 = 32  # CLIP-G stand-in
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj")


def sd3_transformer():
    """SD3 (medium)'s MMDiT: joint blocks over patchified latents and projected captions."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_DIM,
        caption_projection_dim=32, pooled_projection_dim=SD3_TE1 + SD3_TE2, pos_embed_max_size=16,
    )


def build_sd3(seed: int = 0, text_encoders: bool = False) -> Any:
    """SD3: two CLIPs (pooled, and their sequences padded to T5 width) + T5, static shift 3."""
    from diffusers import StableDiffusion3Pipeline

    components: dict[str, Any] = {
        "transformer": seeded(seed, sd3_transformer),
        "vae": seeded(seed, lambda: vae(scaling_factor=1.5305, shift_factor=0.0609, quant_conv=False)),
        "scheduler": flow_scheduler(dynamic=False),
        "text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None,
        "text_encoder_3": None, "tokenizer_3": None,
    }
    if text_encoders:
        components.update(
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), tokenizer_3=t5_tokenizer(),
            text_encoder=seeded(seed, lambda: clip_text_model(SD3_TE1, projection_dim=SD3_TE1)),
            text_encoder_2=seeded(seed, lambda: clip_text_model(SD3_TE2, projection_dim=SD3_TE2)),
            text_encoder_3=seeded(seed, t5_encoder),
        )
    return finish(StableDiffusion3Pipeline(**components))


def sd3_embeds(pipe: Any, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """The CLIP+T5 sequence and both CLIPs' pooled outputs, with negatives for CFG 7."""
    config = pipe.transformer.config
    ref = next(pipe.transformer.parameters())
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for prefix in ("", "negative_"):
        out[f"{prefix}prompt_embeds"] = randn(gen, batch, TEXT_LEN, config.joint_attention_dim, like=ref)
        out[f"{prefix}pooled_prompt_embeds"] = randn(gen, batch, config.pooled_projection_dim, like=ref)
    return out


def _inputs(pipe: Any, seed: int) -> dict[str, Any]:
    return {**sd3_embeds(pipe, seed=seed), "num_inference_steps": 2, "height": 64, "width": 64,
            "output_type": "latent", "generator": torch.Generator().manual_seed(seed)}


CASES = [TinyCase("sd3", "sd3", "StableDiffusion3Pipeline", build_sd3, _inputs, LORA_TARGETS)]
