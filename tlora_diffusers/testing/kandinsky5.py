"""Tiny Kandinsky 5 pipelines: text-to-video, image-to-video, text-to-image and image editing (i2i).

All four share ``Kandinsky5Transformer3DModel``: text blocks (``text_transformer_blocks.N``)
and visual blocks (``visual_transformer_blocks.N``) whose attentions are
``self_attention``/``cross_attention`` with ``to_query``/``to_key``/``to_value``/``out_layer``
and feed-forwards ``feed_forward.in_layer``/``out_layer``. Its adaptive-norm modulations are
zero-initialised in the class (every block is then an identity and a LoRA could not change the
output), so the builders re-draw them, seeded. The video pipelines use the HunyuanVideo VAE
(8x spatial, 4x temporal), the image ones a 4-level ``AutoencoderKL``; the scheduler is
flow-matching Euler. Prompts are passed as Qwen hidden states + cumulative sequence lengths
and the CLIP pooled vector, so no text encoder is built; CFG (``guidance_scale > 1``) is two
separate transformer calls per step, which needs the negative embeddings too.

The image pipelines snap ``(width, height)`` to the nearest aspect ratio in their instance
list ``pipe.resolutions`` (1024 px and up); the builders replace that list by one tiny size.
The image-conditioned pipelines (i2v, i2i) need ``visual_cond=True``: the latents carry the
conditioning latents and a mask as extra channels (``2 * C + 1`` inputs).
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, TEXT_LEN, finish, randn, vae

_TEXT_DIM = 16  # Qwen2.5-VL hidden size stand-in (3584 in the checkpoints)
_POOLED_DIM = 8  # CLIP-L pooled size stand-in (768)
_IMAGE_SIZE = 32  # the one entry of the image pipelines' `resolutions`
_LORA_TARGETS = ("to_query", "to_key", "to_value", "self_attention.out_layer", "cross_attention.out_layer",
                 "feed_forward.in_layer", "feed_forward.out_layer")


def _transformer(visual_cond: bool):
    from diffusers import Kandinsky5Transformer3DModel
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Modulation

    model = Kandinsky5Transformer3DModel(
        in_visual_dim=LATENT_CHANNELS, out_visual_dim=LATENT_CHANNELS, in_text_dim=_TEXT_DIM,
        in_text_dim2=_POOLED_DIM, time_dim=16, patch_size=(1, 2, 2), model_dim=16, ff_dim=32, num_text_blocks=1,
        num_visual_blocks=2, axes_dims=(2, 2, 4), visual_cond=visual_cond,
    )
    with torch.no_grad():  # zero-initialised in the class: draw them so every block does something
        for module in model.modules():
            if isinstance(module, Kandinsky5Modulation):
                module.out_layer.weight.normal_(0.0, 0.2)
                module.out_layer.bias.normal_(0.0, 0.2)
    return model


def _video_vae():
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, act_fn="silu", norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )


def _build(pipeline: str, *, video: bool, visual_cond: bool, shift: float):
    def build(seed: int) -> Any:
        import diffusers
        from diffusers import FlowMatchEulerDiscreteScheduler

        autoencoder = seeded(seed, _video_vae) if video else seeded(
            seed, lambda: vae(scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False))
        pipe = getattr(diffusers, pipeline)(
            transformer=seeded(seed, lambda: _transformer(visual_cond)), vae=autoencoder, text_encoder=None,
            tokenizer=None, text_encoder_2=None, tokenizer_2=None,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        )
        if not video:
            pipe.resolutions = [(_IMAGE_SIZE, _IMAGE_SIZE)]
        return finish(pipe)

    return build


def _embeds(g: torch.Generator, like: torch.Tensor, prefix: str = "") -> dict:
    return {
        f"{prefix}prompt_embeds_qwen": randn(g, 1, TEXT_LEN, _TEXT_DIM, like=like),
        f"{prefix}prompt_embeds_clip": randn(g, 1, _POOLED_DIM, like=like),
        f"{prefix}prompt_cu_seqlens": torch.tensor([0, TEXT_LEN], dtype=torch.int32, device=like.device),
    }


def _inputs(*, video: bool, image: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = torch.empty(0, dtype=pipe.transformer.dtype, device=pipe.transformer.device)
        size = 16 if video else _IMAGE_SIZE
        kwargs = dict(
            **_embeds(g, like), **_embeds(g, like, "negative_"), height=size, width=size, num_inference_steps=2,
            guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(seed),
        )
        if video:
            # I2V renormalises latent frames 0-3 against frames 4+ after the loop (NaN with fewer than 5).
            kwargs["num_frames"] = 17 if image else 5
        if image:
            kwargs["image"] = torch.rand(1, 3, size, size, generator=g)
        return kwargs

    return inputs


CASES = [
    TinyCase(
        name="kandinsky5-t2v", family="kandinsky5", pipeline="Kandinsky5T2VPipeline",
        build=_build("Kandinsky5T2VPipeline", video=True, visual_cond=False, shift=5.0),
        inputs=_inputs(video=True, image=False), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        # The first latent frame is the encoded image, kept out of the scheduler step.
        name="kandinsky5-i2v", family="kandinsky5", pipeline="Kandinsky5I2VPipeline",
        build=_build("Kandinsky5I2VPipeline", video=True, visual_cond=True, shift=5.0),
        inputs=_inputs(video=True, image=True), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="kandinsky5-t2i", family="kandinsky5", pipeline="Kandinsky5T2IPipeline",
        build=_build("Kandinsky5T2IPipeline", video=False, visual_cond=False, shift=3.0),
        inputs=_inputs(video=False, image=False), lora_targets=_LORA_TARGETS,
    ),
    TinyCase(
        name="kandinsky5-i2i", family="kandinsky5", pipeline="Kandinsky5I2IPipeline",
        build=_build("Kandinsky5I2IPipeline", video=False, visual_cond=True, shift=3.0),
        inputs=_inputs(video=False, image=True), lora_targets=_LORA_TARGETS,
    ),
]
