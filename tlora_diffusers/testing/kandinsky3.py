"""Tiny Kandinsky 3 pipelines: text-to-image and img2img (``Kandinsky3UNet``).

The UNet keeps the real module names (``down_blocks.N.attentions.M.attention.to_q/.../feed_forward.0``,
``add_time_condition.attention``) at two levels; the MoVQ is a 4-level (8x, like the
checkpoint's) spatially-normalised ``VQModel``; the scheduler is the checkpoint's DDPM
(integer timesteps in ``[0, 1000)``). Prompts are passed as T5 embeddings with their
attention masks, so no T5 is built. The pipelines run CFG in one doubled batch
(``[negative, positive]``) at the default ``guidance_scale=3`` with the Kandinsky
formula ``(g + 1) * cond - g * uncond``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, finish, randn

_TEXT_DIM = 32  # T5 encoder hidden size stand-in (4096 in the checkpoint)
_TEXT_LEN = 8
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "feed_forward.0", "feed_forward.2")


def _unet():
    from diffusers import Kandinsky3UNet

    return Kandinsky3UNet(
        in_channels=LATENT_CHANNELS, time_embedding_dim=16, groups=4, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(16, 32), cross_attention_dim=16, encoder_hid_dim=_TEXT_DIM,
    )


def _movq():
    from diffusers import VQModel

    return VQModel(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, vq_embed_dim=LATENT_CHANNELS,
        num_vq_embeddings=16, block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3, norm_type="spatial",
    )


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        thresholding=False, steps_offset=1, timestep_spacing="leading",
    )


def _build(pipeline: str):
    def build(seed: int) -> Any:
        import diffusers

        return finish(getattr(diffusers, pipeline)(
            tokenizer=None, text_encoder=None, unet=seeded(seed, _unet), scheduler=_scheduler(),
            movq=seeded(seed, _movq),
        ))

    return build


def _inputs(*, image: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = next(pipe.unet.parameters())
        mask = torch.ones(1, _TEXT_LEN, dtype=torch.long, device=like.device)
        kwargs = dict(
            prompt_embeds=randn(g, 1, _TEXT_LEN, _TEXT_DIM, like=like), attention_mask=mask,
            negative_prompt_embeds=randn(g, 1, _TEXT_LEN, _TEXT_DIM, like=like), negative_attention_mask=mask.clone(),
            num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(seed),
        )
        if image:
            # strength 0.7 of 3 steps: 2 steps run.
            kwargs.update(image=torch.rand(1, 3, 64, 64, generator=g), strength=0.7, num_inference_steps=3)
        else:
            kwargs.update(height=64, width=64)
        return kwargs

    return inputs


CASES = [
    TinyCase("kandinsky3", "kandinsky3", "Kandinsky3Pipeline", _build("Kandinsky3Pipeline"), _inputs(image=False),
             _LORA_TARGETS, ("unet",)),
    TinyCase("kandinsky3-img2img", "kandinsky3", "Kandinsky3Img2ImgPipeline", _build("Kandinsky3Img2ImgPipeline"),
             _inputs(image=True), _LORA_TARGETS, ("unet",)),
]
