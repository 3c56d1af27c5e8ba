"""Tiny Stable unCLIP pipelines: text-to-image (a ``PriorTransformer`` prior, then the UNet) and image
variation (``StableUnCLIPImg2ImgPipeline``, UNet only).

``StableUnCLIPPipeline`` runs two denoising loops one after the other: the ``prior``
(``PriorTransformer``, Karlo's DDPM ``prior_scheduler``, 2 steps) turns the CLIP text embedding
into a CLIP image embedding, which is noised by ``image_noising_scheduler`` to ``noise_level``
and fed to the ``unet`` (SD 2.1-style, ``class_embed_type="projection"``; DDIM v-prediction
``scheduler``, 2 steps) as ``class_labels``. The prior path always tokenizes ``prompt`` (no
embeddings argument reaches it), so this case builds the tiny CLIP tokenizer and both text
towers and passes a prompt string. The image-variation case encodes its image with a tiny
CLIP vision tower. LoRA targets are the attention/feed-forward names that both the UNet and
the prior (``transformer_blocks.N.attn1/ff``) use; the cases put LoRAs on ``unet`` only.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, clip_text_model, clip_tokenizer, finish, vae
from .stable_diffusion import SD_TE

_EMB = 32  # CLIP image/text embedding width (1024 in SD 2.1 unCLIP / 768 Karlo)
_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), cross_attention_dim=SD_TE,
        use_linear_projection=True, class_embed_type="projection", projection_class_embeddings_input_dim=2 * _EMB,
    )


def _prior():
    from diffusers import PriorTransformer

    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=8, embedding_dim=_EMB, num_layers=1)
    # `post_process_latents` de-normalises with the CLIP stats `clip_std` / `clip_mean`, which are *zero*-initialised
    # parameters (the checkpoint fills them): left at zero the prior's output would be multiplied away.
    with torch.no_grad():
        prior.clip_std.fill_(1.0)
    return prior


def _schedulers() -> dict[str, Any]:
    from diffusers import DDIMScheduler, DDPMScheduler

    return dict(
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        scheduler=DDIMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1, clip_sample=False,
            timestep_spacing="leading",
        ),
    )


def _common(seed: int) -> dict[str, Any]:
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )

    return dict(
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=_EMB), **_schedulers(),
        tokenizer=clip_tokenizer(), text_encoder=seeded(seed, lambda: clip_text_model(SD_TE, projection_dim=None)),
        unet=seeded(seed, _unet), vae=seeded(seed, lambda: vae(scaling_factor=0.18215, shift_factor=None,
                                                              quant_conv=True)),
    )


def _build_text(seed: int) -> Any:
    from diffusers import DDPMScheduler, StableUnCLIPPipeline

    return finish(StableUnCLIPPipeline(
        prior_tokenizer=clip_tokenizer(),
        prior_text_encoder=seeded(seed, lambda: clip_text_model(_EMB, projection_dim=_EMB)),
        prior=seeded(seed, _prior),
        prior_scheduler=DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="fixed_small_log",
            prediction_type="sample", clip_sample=True, clip_sample_range=5.0,
        ),
        **_common(seed),
    ))


def _build_image(seed: int) -> Any:
    from diffusers import StableUnCLIPImg2ImgPipeline
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    def encoder():
        return CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=8, projection_dim=_EMB,
        ))

    return finish(StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32), image_encoder=seeded(seed, encoder),
        **_common(seed),
    ))


def _inputs(*, image: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        kwargs = dict(prompt="a tiny test", height=64, width=64, num_inference_steps=2, output_type="latent",
                      generator=torch.Generator().manual_seed(seed))
        if image:
            from PIL import Image

            g = torch.Generator().manual_seed(seed + 100)
            kwargs["image"] = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy())
        else:
            kwargs["prior_num_inference_steps"] = 2
        return kwargs

    return inputs


CASES = [
    TinyCase("stable-unclip", "stable-unclip", "StableUnCLIPPipeline", _build_text, _inputs(image=False),
             _LORA_TARGETS, ("unet",)),
    TinyCase("stable-unclip-img2img", "stable-unclip", "StableUnCLIPImg2ImgPipeline", _build_image,
             _inputs(image=True), _LORA_TARGETS, ("unet",)),
]
