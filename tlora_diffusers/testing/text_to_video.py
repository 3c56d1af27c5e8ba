"""Tiny ModelScope text-to-video pipelines (``UNet3DConditionModel``): text-to-video and video-to-video.

The UNet keeps the real module names (spatial ``attentions.N.transformer_blocks.0.attn1/attn2/ff``
and temporal ``temp_attentions.N``, ``temp_convs.N.conv1..4``) at two levels; the VAE is the
4-level SD ``AutoencoderKL``; the scheduler is the checkpoint's DDIM (integer timesteps). Both
pipelines are deprecated in diffusers but still exported. Prompts are passed as CLIP
embeddings with negatives (CFG in one doubled batch at the default guidance 9 / 15);
2 frames of 64x64 (8x8 latents).
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, finish, vae
from .stable_diffusion import SD_TE, sd_embeds

_FRAMES = 2
_SIZE = 64
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def _unet():
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=SD_TE, attention_head_dim=4,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )


def _build(pipeline: str):
    def build(seed: int) -> Any:
        import diffusers

        return finish(getattr(diffusers, pipeline)(
            vae=seeded(seed, lambda: vae(scaling_factor=0.18215, shift_factor=None, quant_conv=True)),
            text_encoder=None, tokenizer=None, unet=seeded(seed, _unet), scheduler=_scheduler(),
        ))

    return build


def _inputs(*, video: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        kwargs = dict(**sd_embeds(pipe, seed=seed), num_inference_steps=2, output_type="latent",
                      generator=torch.Generator().manual_seed(seed))
        if video:
            from PIL import Image

            g = torch.Generator().manual_seed(seed + 100)
            kwargs["video"] = [Image.fromarray((torch.rand(_SIZE, _SIZE, 3, generator=g) * 255).to(torch.uint8).numpy())
                               for _ in range(_FRAMES)]
            # strength 0.7 of 3 steps: 2 steps run.
            kwargs.update(strength=0.7, num_inference_steps=3)
        else:
            kwargs.update(height=_SIZE, width=_SIZE, num_frames=_FRAMES)
        return kwargs

    return inputs


CASES = [
    TinyCase("text-to-video-sd", "text-to-video-sd", "TextToVideoSDPipeline", _build("TextToVideoSDPipeline"),
             _inputs(video=False), _LORA_TARGETS, ("unet",)),
    TinyCase("video-to-video-sd", "text-to-video-sd", "VideoToVideoSDPipeline", _build("VideoToVideoSDPipeline"),
             _inputs(video=True), _LORA_TARGETS, ("unet",)),
]
