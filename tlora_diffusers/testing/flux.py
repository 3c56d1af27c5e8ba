"""Tiny FLUX.1 pipelines: text-to-image, img2img, Kontext, Fill and ControlNet."""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, TEXT_LEN, clip_text_model, clip_tokenizer, finish, flow_scheduler, randn, \
    t5_encoder, t5_tokenizer, unzero, vae

__all__ = ["CASES", "flux_transformer", "build_flux", "flux_embeds", "LORA_TARGETS", "FLUX_CLIP", "T5_DIM"]

FLUX_CLIP = 32  # pooled_projection_dim (CLIP pooler output)
T5_DIM = 64  # T5 d_model: Flux joint_attention_dim
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "ff.net.0.proj")
#: Fill packs 2x2 patches of: the noisy latents, the masked image latents and the 8x8 mask.
_FILL_CHANNELS = 4 * LATENT_CHANNELS * 2 + 8 * 8 * 4


def flux_transformer(in_channels: int = 4 * LATENT_CHANNELS, guidance_embeds: bool = True):
    """FLUX.1 [dev]'s transformer: double- and single-stream blocks plus guidance embedding."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_DIM,
        pooled_projection_dim=FLUX_CLIP, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )


def build_flux(seed: int = 0, text_encoders: bool = False, pipeline: str = "FluxPipeline",
               controlnet: bool = False) -> Any:
    """FLUX.1 [dev]: CLIP pooled + T5 sequence, dynamically shifted flow matching."""
    import diffusers

    in_channels = _FILL_CHANNELS if pipeline == "FluxFillPipeline" else 4 * LATENT_CHANNELS
    components: dict[str, Any] = {
        "transformer": seeded(seed, lambda: flux_transformer(in_channels)),
        "vae": seeded(seed, lambda: vae(scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False)),
        "scheduler": flow_scheduler(dynamic=True),
        "text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None,
    }
    if text_encoders:
        components.update(tokenizer=clip_tokenizer(), tokenizer_2=t5_tokenizer(),
                          text_encoder=seeded(seed, lambda: clip_text_model(FLUX_CLIP, projection_dim=None)),
                          text_encoder_2=seeded(seed, t5_encoder))
    if controlnet:
        components["controlnet"] = seeded(seed + 1, lambda: unzero(diffusers.FluxControlNetModel.from_transformer(
            components["transformer"], num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, load_weights_from_transformer=True)))
    return finish(getattr(diffusers, pipeline)(**components))


def flux_embeds(pipe: Any, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """T5 states (joint_attention_dim) and CLIP's pooled output; FLUX.1 [dev] has no CFG by default."""
    config = pipe.transformer.config
    ref = next(pipe.transformer.parameters())
    gen = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": randn(gen, batch, TEXT_LEN, config.joint_attention_dim, like=ref),
            "pooled_prompt_embeds": randn(gen, batch, config.pooled_projection_dim, like=ref)}


def _image(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed + 100))


def _mask(seed: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    return mask


def _inputs(**extra):
    def inputs(pipe: Any, seed: int) -> dict[str, Any]:
        return {**flux_embeds(pipe, seed=seed), "num_inference_steps": 2, "height": 64, "width": 64,
                "output_type": "latent", "generator": torch.Generator().manual_seed(seed),
                **{k: v(seed) if callable(v) else v for k, v in extra.items()}}

    return inputs


CASES = [
    TinyCase("flux", "flux", "FluxPipeline", build_flux, _inputs(), LORA_TARGETS),
    TinyCase("flux-img2img", "flux", "FluxImg2ImgPipeline",
             lambda seed: build_flux(seed, pipeline="FluxImg2ImgPipeline"),
             _inputs(image=_image, strength=0.8, num_inference_steps=3), LORA_TARGETS),
    TinyCase("flux-kontext", "flux", "FluxKontextPipeline",
             lambda seed: build_flux(seed, pipeline="FluxKontextPipeline"),
             _inputs(image=_image, max_area=64 * 64, _auto_resize=False), LORA_TARGETS),
    TinyCase("flux-fill", "flux", "FluxFillPipeline", lambda seed: build_flux(seed, pipeline="FluxFillPipeline"),
             _inputs(image=_image, mask_image=_mask), LORA_TARGETS),
    TinyCase("flux-controlnet", "flux", "FluxControlNetPipeline",
             lambda seed: build_flux(seed, pipeline="FluxControlNetPipeline", controlnet=True),
             _inputs(control_image=_image), LORA_TARGETS, ("transformer", "controlnet")),
]
