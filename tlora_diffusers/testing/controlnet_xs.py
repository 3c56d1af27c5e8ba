"""Tiny ControlNet-XS pipelines (``UNetControlNetXSModel``): SD 1.x and SDXL.

Built the way the checkpoints are loaded: a tiny SD/SDXL ``UNet2DConditionModel`` (those of
:mod:`.stable_diffusion` with 2 layers per block, which ControlNet-XS requires) plus a
``ControlNetXSAdapter`` (half the UNet's widths), which the pipeline's ``__init__`` fuses into one
``UNetControlNetXSModel`` (``unet``: base and control branches in the same blocks,
``down_blocks.N.base_attentions.M`` / ``ctrl_attentions.M``, ``mid_block.base_midblock`` /
``ctrl_midblock``). The fused model *copies* the adapter's weights; the separately registered
``controlnet`` (the adapter) is never called (``ControlNetXSAdapter.forward`` raises), so LoRAs go
on ``unet`` only. Both pipelines are deprecated in diffusers but still exported.
They pass the timestep by keyword (``timestep=t``); CFG is one doubled batch.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, finish, vae
from .stable_diffusion import (
    SD_TE,
    SDXL_POOLED,
    SDXL_TE1,
    SDXL_TE2,
    SDXL_TIME_EMBED,
    sd_embeds,
    sdxl_embeds,
)

_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def _unet(xl: bool):
    """The tiny SD/SDXL UNet of :mod:`.stable_diffusion` with 2 layers per block: ``UNetControlNetXSModel``
    hardcodes SD's 2 resnets per down block (3 per up block) when it fuses the UNet."""
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, block_out_channels=(32, 64),
        layers_per_block=2, norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
    )
    if not xl:
        return UNet2DConditionModel(**common, cross_attention_dim=SD_TE)
    return UNet2DConditionModel(
        **common, transformer_layers_per_block=(1, 1), use_linear_projection=True,
        cross_attention_dim=SDXL_TE1 + SDXL_TE2, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + SDXL_POOLED,
    )


def _euler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    )


def _adapter(unet):
    from diffusers import ControlNetXSAdapter

    return ControlNetXSAdapter.from_unet(unet, size_ratio=0.5, conditioning_embedding_out_channels=(8, 8, 8, 8))


def _build(xl: bool):
    def build(seed: int) -> Any:
        import diffusers

        unet = seeded(seed, lambda: _unet(xl))
        components: dict[str, Any] = dict(
            vae=seeded(seed, lambda: vae(scaling_factor=0.13025 if xl else 0.18215, shift_factor=None,
                                         quant_conv=True)),
            text_encoder=None, tokenizer=None, unet=unet, controlnet=seeded(seed + 1, lambda: _adapter(unet)),
            scheduler=_euler(),
        )
        if xl:
            components.update(text_encoder_2=None, tokenizer_2=None, add_watermarker=False)
            cls = diffusers.StableDiffusionXLControlNetXSPipeline
        else:
            components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            cls = diffusers.StableDiffusionControlNetXSPipeline
        # `UNetControlNetXSModel.from_unet` builds a fresh model and loads both parts into it; seeded for safety.
        return finish(seeded(seed + 2, lambda: cls(**components)))

    return build


def _inputs(embeds):
    def inputs(pipe: Any, seed: int) -> dict:
        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed + 100))
        return dict(**embeds(pipe, seed=seed), image=image, height=64, width=64, num_inference_steps=2,
                    output_type="latent", generator=torch.Generator().manual_seed(seed))

    return inputs


CASES = [
    TinyCase("controlnet-xs", "controlnet-xs", "StableDiffusionControlNetXSPipeline", _build(False),
             _inputs(sd_embeds), _LORA_TARGETS, ("unet",)),
    TinyCase("controlnet-xs-sdxl", "controlnet-xs", "StableDiffusionXLControlNetXSPipeline", _build(True),
             _inputs(sdxl_embeds), _LORA_TARGETS, ("unet",)),
]
