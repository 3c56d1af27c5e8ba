"""Tiny Stable Diffusion 1.x and SDXL pipelines (text-to-image, img2img, inpaint, ControlNet)."""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import CLIP_MAX_LENGTH, LATENT_CHANNELS, clip_text_model, clip_tokenizer, finish, randn, unzero, vae

__all__ = ["CASES", "sdxl_unet", "sd_unet", "build_sdxl", "build_sd", "sdxl_embeds", "sd_embeds", "LORA_TARGETS"]

SDXL_TE1 = 32  # CLIP-L stand-in (768 in SDXL)
SDXL_TE2 = 64  # CLIP-G stand-in (1280 in SDXL)
SDXL_POOLED = 32  # text_encoder_2 projection_dim
SDXL_TIME_EMBED = 8  # addition_time_embed_dim; SDXL feeds 6 micro-conditioning numbers
SD_TE = 32

#: A test LoRA on attention, feed-forward and 3x3 convs (LyCORIS crashes on those; we do not).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj")


def _euler(**extra: Any):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
        use_karras_sigmas=False, **extra,
    )


def sdxl_unet():
    """A 2-level SDXL UNet: cross-attention down/mid/up blocks and the text-time embedding."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), use_linear_projection=True,
        cross_attention_dim=SDXL_TE1 + SDXL_TE2, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + SDXL_POOLED,
    )


def sd_unet():
    """A 2-level SD 1.x UNet (one CLIP, no added conditioning)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=SD_TE,
    )


def _sdxl_components(seed: int, text_encoders: bool) -> dict[str, Any]:
    components: dict[str, Any] = {
        "unet": seeded(seed, sdxl_unet),
        "vae": seeded(seed, lambda: vae(scaling_factor=0.13025, shift_factor=None, quant_conv=True)),
        "scheduler": _euler(),
        "text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None,
    }
    if text_encoders:
        components.update(
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(),
            text_encoder=seeded(seed, lambda: clip_text_model(SDXL_TE1, projection_dim=None)),
            text_encoder_2=seeded(seed, lambda: clip_text_model(SDXL_TE2, projection_dim=SDXL_POOLED)),
        )
    return components


def build_sdxl(seed: int = 0, text_encoders: bool = False, pipeline: str = "StableDiffusionXLPipeline",
               controlnet: Any = False) -> Any:
    """SDXL: UNet + two CLIP text towers, Euler with SDXL's "leading" spacing and offset 1.

    ``controlnet``: ``True`` for a ``ControlNetModel``, ``"union"`` for a ``ControlNetUnionModel``.
    """
    import diffusers

    components = _sdxl_components(seed, text_encoders)
    if controlnet == "union":
        components["controlnet"] = seeded(seed + 1, lambda: unzero(_union_controlnet(components["unet"])))
    elif controlnet:
        components["controlnet"] = seeded(seed + 1, lambda: unzero(diffusers.ControlNetModel.from_unet(components["unet"])))
    kwargs = {"add_watermarker": False}
    return finish(getattr(diffusers, pipeline)(**components, **kwargs))


def _union_controlnet(unet: Any) -> Any:
    """A ``ControlNetUnionModel`` of the tiny UNet's shape; its control-type transformer narrowed to 32 wide."""
    from diffusers import ControlNetUnionModel

    shape = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16),
                                           load_weights_from_unet=False).config
    return ControlNetUnionModel.from_config(shape, num_trans_channel=32, num_proj_channel=32, num_trans_head=2)


def build_sd(seed: int = 0, text_encoders: bool = False, pipeline: str = "StableDiffusionPipeline") -> Any:
    """SD 1.x: UNet + one CLIP, Euler, no safety checker."""
    import diffusers

    components: dict[str, Any] = {
        "unet": seeded(seed, sd_unet),
        "vae": seeded(seed, lambda: vae(scaling_factor=0.18215, shift_factor=None, quant_conv=True)),
        "scheduler": _euler(), "text_encoder": None, "tokenizer": None,
        "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False,
    }
    if text_encoders:
        components.update(tokenizer=clip_tokenizer(),
                          text_encoder=seeded(seed, lambda: clip_text_model(SD_TE, projection_dim=None)))
    if pipeline != "StableDiffusionPipeline":
        components.pop("requires_safety_checker")
    return finish(getattr(diffusers, pipeline)(**components))


def sdxl_embeds(pipe: Any, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """The two CLIPs' penultimate states concatenated plus CLIP-G's pooled projection, with negatives
    so the default CFG (guidance 5.0) runs without text encoders."""
    config = pipe.unet.config
    ref = next(pipe.unet.parameters())
    gen = torch.Generator().manual_seed(seed)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    out = {}
    for prefix in ("", "negative_"):
        out[f"{prefix}prompt_embeds"] = randn(gen, batch, CLIP_MAX_LENGTH, config.cross_attention_dim, like=ref)
        out[f"{prefix}pooled_prompt_embeds"] = randn(gen, batch, pooled, like=ref)
    return out


def sd_embeds(pipe: Any, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """CLIP's last hidden states, with negatives for the default CFG (7.5)."""
    ref = next(pipe.unet.parameters())
    gen = torch.Generator().manual_seed(seed)
    dim = pipe.unet.config.cross_attention_dim
    return {f"{p}prompt_embeds": randn(gen, batch, CLIP_MAX_LENGTH, dim, like=ref) for p in ("", "negative_")}


def _image(seed: int, size: int = 64) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 100))


def _inputs(embeds, **extra):
    def inputs(pipe: Any, seed: int) -> dict[str, Any]:
        return {**embeds(pipe, seed=seed), "num_inference_steps": 2, "height": 64, "width": 64,
                "output_type": "latent", "generator": torch.Generator().manual_seed(seed),
                **{k: v(seed) if callable(v) else v for k, v in extra.items()}}

    return inputs


def _mask(seed: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    return mask


CASES = [
    TinyCase("sd", "stable-diffusion", "StableDiffusionPipeline", build_sd, _inputs(sd_embeds), LORA_TARGETS, ("unet",)),
    TinyCase("sdxl", "stable-diffusion", "StableDiffusionXLPipeline", build_sdxl, _inputs(sdxl_embeds),
             LORA_TARGETS, ("unet",)),
    TinyCase("sdxl-img2img", "stable-diffusion", "StableDiffusionXLImg2ImgPipeline",
             lambda seed: build_sdxl(seed, pipeline="StableDiffusionXLImg2ImgPipeline"),
             _inputs(sdxl_embeds, image=_image, strength=0.75, num_inference_steps=3), LORA_TARGETS, ("unet",)),
    TinyCase("sdxl-inpaint", "stable-diffusion", "StableDiffusionXLInpaintPipeline",
             lambda seed: build_sdxl(seed, pipeline="StableDiffusionXLInpaintPipeline"),
             _inputs(sdxl_embeds, image=_image, mask_image=_mask, strength=0.99, num_inference_steps=4), LORA_TARGETS,
             ("unet",)),
    TinyCase("sdxl-controlnet", "stable-diffusion", "StableDiffusionXLControlNetPipeline",
             lambda seed: build_sdxl(seed, pipeline="StableDiffusionXLControlNetPipeline", controlnet=True),
             _inputs(sdxl_embeds, image=_image), LORA_TARGETS, ("unet", "controlnet")),
    TinyCase("sdxl-controlnet-union", "stable-diffusion", "StableDiffusionXLControlNetUnionPipeline",
             lambda seed: build_sdxl(seed, pipeline="StableDiffusionXLControlNetUnionPipeline", controlnet="union"),
             _inputs(sdxl_embeds, control_image=lambda seed: [_image(seed)], control_mode=[0]), LORA_TARGETS,
             ("unet", "controlnet")),
]
