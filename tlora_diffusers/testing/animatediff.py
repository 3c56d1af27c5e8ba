"""Tiny AnimateDiff pipelines (``UNetMotionModel``): text-to-video (SD 1.x and SDXL), video-to-video,
PAG, ControlNet, video-to-video ControlNet, SparseCtrl and PIA.

Each pipeline is built the way the checkpoints are loaded: the tiny SD/SDXL ``UNet2DConditionModel``
of :mod:`.stable_diffusion` plus a ``MotionAdapter`` matching its levels, which the pipeline's
``__init__`` fuses into a ``UNetMotionModel`` (``unet``; spatial names as in SD,
``down_blocks.N.motion_modules.M.transformer_blocks.0.attn1/...`` for the temporal layers, which the
shared LoRA targets also hit). The ControlNet cases add a 2D ``ControlNetModel`` (called on the
frames flattened into the batch) or a ``SparseControlNetModel`` (RGB variant: VAE-encoded
condition frames plus a mask) as ``controlnet``. The scheduler is the AnimateDiff examples' DDIM
(``linspace`` spacing, integer timesteps). Prompts are passed as embeddings; 2 frames of 64x64
(8x8 latents). PIA's UNet takes 9 channels (latents, mask, masked image latents) through the
adapter's ``conv_in_channels``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import finish, unzero, vae
from .stable_diffusion import (
    LORA_TARGETS,
    SD_TE,
    sd_embeds,
    sd_unet,
    sdxl_embeds,
    sdxl_unet,
)

_FRAMES = 2
_SIZE = 64


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
        timestep_spacing="linspace", steps_offset=1,
    )


def _adapter(*, mid_block: bool = True, conv_in_channels: int | None = None):
    """A motion adapter for the tiny SD/SDXL UNets' two levels (320/640/1280... in the checkpoints)."""
    from diffusers import MotionAdapter

    return MotionAdapter(
        block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
        motion_norm_num_groups=8, motion_max_seq_length=32, use_motion_mid_block=mid_block,
        conv_in_channels=conv_in_channels,
    )


def _sd_vae():
    return vae(scaling_factor=0.18215, shift_factor=None, quant_conv=True)


def _controlnet(unet):
    from diffusers import ControlNetModel

    return unzero(ControlNetModel.from_unet(unet))


def _sparse_controlnet():
    """SparseCtrl RGB: the condition frames are VAE-encoded (4 channels) plus the frame mask."""
    from diffusers import SparseControlNetModel

    return unzero(SparseControlNetModel(
        in_channels=4, conditioning_channels=4, down_block_types=("DownBlockMotion", "CrossAttnDownBlockMotion"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=SD_TE,
        attention_head_dim=(2, 4), conditioning_embedding_out_channels=(8, 16), motion_num_attention_heads=2,
        use_simplified_condition_embedding=True,
    ))


def _build_sd(pipeline: str, *, controlnet: str | None = None):
    def build(seed: int) -> Any:
        import diffusers

        unet = seeded(seed, sd_unet)
        components: dict[str, Any] = dict(
            vae=seeded(seed, _sd_vae), text_encoder=None, tokenizer=None, unet=unet, scheduler=_ddim(),
            feature_extractor=None, image_encoder=None,
        )
        if pipeline == "PIAPipeline":
            components["motion_adapter"] = seeded(seed + 2, lambda: _adapter(conv_in_channels=9))
        else:
            components["motion_adapter"] = seeded(seed + 2, _adapter)
        if controlnet == "controlnet":
            components["controlnet"] = seeded(seed + 1, lambda: _controlnet(unet))
        elif controlnet == "sparse":
            components["controlnet"] = seeded(seed + 1, _sparse_controlnet)
        # The pipeline fuses unet + adapter into a fresh UNetMotionModel (`from_unet2d`), seeded here too.
        return finish(seeded(seed + 3, lambda: getattr(diffusers, pipeline)(**components)))

    return build


def _build_sdxl(seed: int) -> Any:
    from diffusers import AnimateDiffSDXLPipeline

    components = dict(
        vae=seeded(seed, lambda: vae(scaling_factor=0.13025, shift_factor=None, quant_conv=True)),
        text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=seeded(seed, sdxl_unet),
        motion_adapter=seeded(seed + 2, lambda: _adapter(mid_block=False)), scheduler=_ddim(),
    )
    # `UNetMotionModel.from_unet2d` does not copy the 2D UNet's `add_embedding` (SDXL's text-time
    # projection): the fused UNet keeps a fresh one, drawn from the RNG that this `seeded` fixes.
    return finish(seeded(seed + 3, lambda: AnimateDiffSDXLPipeline(**components)))


def _frames(g: torch.Generator, n: int = _FRAMES) -> list:
    from PIL import Image

    return [Image.fromarray((torch.rand(_SIZE, _SIZE, 3, generator=g) * 255).to(torch.uint8).numpy())
            for _ in range(n)]


def _inputs(embeds, *, steps: int = 2, video: bool = False, conditioning: bool = False, image: bool = False,
            global_seed: bool = False, **extra):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed + 100)
        if global_seed:  # the pipeline samples from the global generator (SparseCtrl's VAE encode takes none)
            torch.manual_seed(seed)
        kwargs = dict(
            **embeds(pipe, seed=seed), num_frames=_FRAMES, height=_SIZE, width=_SIZE, num_inference_steps=steps,
            output_type="latent", generator=torch.Generator().manual_seed(seed), **extra,
        )
        if video:
            kwargs.pop("num_frames")
            kwargs["video"] = _frames(g)
        if conditioning:
            kwargs["conditioning_frames"] = _frames(g)
        if image:
            kwargs["image"] = _frames(g, 1)[0]
        return kwargs

    return inputs


_UNET = ("unet",)
_UNET_CN = ("unet", "controlnet")

CASES = [
    TinyCase("animatediff", "animatediff", "AnimateDiffPipeline", _build_sd("AnimateDiffPipeline"),
             _inputs(sd_embeds), LORA_TARGETS, _UNET),
    TinyCase("animatediff-sdxl", "animatediff", "AnimateDiffSDXLPipeline", _build_sdxl, _inputs(sdxl_embeds),
             LORA_TARGETS, _UNET),
    # strength 0.7 of 3 steps: 2 steps run.
    TinyCase("animatediff-v2v", "animatediff", "AnimateDiffVideoToVideoPipeline",
             _build_sd("AnimateDiffVideoToVideoPipeline"), _inputs(sd_embeds, steps=3, video=True, strength=0.7),
             LORA_TARGETS, _UNET),
    TinyCase("animatediff-pag", "animatediff", "AnimateDiffPAGPipeline", _build_sd("AnimateDiffPAGPipeline"),
             _inputs(sd_embeds), LORA_TARGETS, _UNET),
    TinyCase("animatediff-controlnet", "animatediff", "AnimateDiffControlNetPipeline",
             _build_sd("AnimateDiffControlNetPipeline", controlnet="controlnet"),
             _inputs(sd_embeds, conditioning=True), LORA_TARGETS, _UNET_CN),
    TinyCase("animatediff-v2v-controlnet", "animatediff", "AnimateDiffVideoToVideoControlNetPipeline",
             _build_sd("AnimateDiffVideoToVideoControlNetPipeline", controlnet="controlnet"),
             _inputs(sd_embeds, steps=3, video=True, conditioning=True, strength=0.7), LORA_TARGETS, _UNET_CN),
    TinyCase("animatediff-sparsectrl", "animatediff", "AnimateDiffSparseControlNetPipeline",
             _build_sd("AnimateDiffSparseControlNetPipeline", controlnet="sparse"),
             _inputs(sd_embeds, conditioning=True, global_seed=True, controlnet_frame_indices=[0, 1]), LORA_TARGETS, _UNET_CN),
    TinyCase("pia", "animatediff", "PIAPipeline", _build_sd("PIAPipeline"), _inputs(sd_embeds, image=True),
             LORA_TARGETS, _UNET),
]
