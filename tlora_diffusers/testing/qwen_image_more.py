"""Tiny Qwen-Image pipelines beyond text-to-image and Edit: ControlNet, Layered and Edit Plus.

All pass ``t.expand(B).to(latents.dtype) / 1000`` and run true CFG as a second transformer
call. ``QwenImageControlNetPipeline`` calls its ``QwenImageControlNetModel`` once per step
(conditional prompt) with the same ``t / 1000`` and feeds its samples to both transformer
calls; its zero-initialised projections get small random weights so that it reaches the
output. ``QwenImageLayeredPipeline`` decomposes an RGBA image (4-channel VAE) into
``layers + 1`` latent images at a bucketed 640x640, with the layered transformer options
(``use_additional_t_cond``, ``use_layer3d_rope``); it reads ``text_encoder.dtype`` and captions
the image when no prompt string is given, so it gets a prompt string, prompt embeddings and a
tiny Qwen2.5-VL. ``QwenImageEditPlusPipeline`` takes a list of reference images; this case uses
Qwen-Image-Edit-2511's ``zero_cond_t``: the transformer itself modulates the reference tokens
at timestep 0 (it doubles the timestep batch internally).
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import finish, unzero
from .qwen_image import _JOINT_DIM, _TARGETS, _Z_DIM, _embeds, _scheduler

__all__ = ["CASES"]

_LAYERED_Z = 8


def _transformer(z_dim: int = _Z_DIM, **extra):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=_JOINT_DIM, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        **extra,
    )


def _vae(input_channels: int = 3, z_dim: int = _Z_DIM):
    """``qwen_image._vae`` (16x, 2 channels wide, no residual blocks); RGBA for Layered."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=2, z_dim=z_dim, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=0, input_channels=input_channels,
        temperal_downsample=[False, True, True, False], latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim,
    )


def _qwen25_vl():
    """A 1-layer Qwen2.5-VL; the Layered pipeline only reads its dtype when given prompt embeddings."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": 300, "hidden_size": _JOINT_DIM, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "rope_scaling": {
                         "type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": _JOINT_DIM, "fullatt_block_indexes": [0]},
        vocab_size=300,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _build(pipeline: str):
    def build(seed: int) -> Any:
        import diffusers

        def make():
            parts: dict[str, Any] = {"vae": _vae(), "scheduler": _scheduler(), "text_encoder": None,
                                     "tokenizer": None}
            if pipeline == "QwenImageControlNetPipeline":
                parts["transformer"] = _transformer()
                parts["controlnet"] = unzero(diffusers.QwenImageControlNetModel.from_transformer(
                    parts["transformer"], num_layers=1, attention_head_dim=16, num_attention_heads=2))
            elif pipeline == "QwenImageLayeredPipeline":
                # An RGBA image with as many channels as the latents is taken for latents (not
                # encoded), so the Layered VAE gets 8 latent channels.
                parts.update(transformer=_transformer(_LAYERED_Z, use_additional_t_cond=True, use_layer3d_rope=True),
                             vae=_vae(input_channels=4, z_dim=_LAYERED_Z), text_encoder=_qwen25_vl(), processor=None)
            else:  # QwenImageEditPlusPipeline
                parts.update(transformer=_transformer(zero_cond_t=True), processor=None)
            return getattr(diffusers, pipeline)(**parts)

        return finish(seeded(seed, make))

    return build


def _pil(g: torch.Generator, size: int = 32, mode: str = "RGB"):
    from PIL import Image

    channels = len(mode)
    pixels = (torch.rand(size, size, channels, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, mode=mode)


def _inputs(pipeline: str):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        kwargs: dict[str, Any] = {**_embeds(g), "num_inference_steps": 2, "output_type": "latent",
                                  "generator": torch.Generator().manual_seed(seed)}
        if pipeline == "QwenImageControlNetPipeline":
            kwargs.update(control_image=_pil(g, 64), height=64, width=64)
        elif pipeline == "QwenImageLayeredPipeline":
            # Output size is the 640x640 bucket whatever the input size; 1 layer + the composite.
            # output_type="latent" raises UnboundLocalError (`images`) in diffusers 0.42.1, so "np":
            # one (layers, 640, 640, 4) array per prompt.
            kwargs.update(image=_pil(g, 32, "RGBA"), prompt="a cat", layers=1, resolution=640, output_type="np")
        else:  # a list of reference images (one: each is resized to ~1024x1024 for the VAE)
            kwargs.update(image=[_pil(g)], height=64, width=64)
        return kwargs

    return inputs


CASES = [
    TinyCase("qwen-image-controlnet", "qwen-image", "QwenImageControlNetPipeline",
             _build("QwenImageControlNetPipeline"), _inputs("QwenImageControlNetPipeline"), _TARGETS,
             ("transformer", "controlnet")),
    TinyCase("qwen-image-layered", "qwen-image", "QwenImageLayeredPipeline", _build("QwenImageLayeredPipeline"),
             _inputs("QwenImageLayeredPipeline"), _TARGETS),
    TinyCase("qwen-image-edit-plus", "qwen-image", "QwenImageEditPlusPipeline", _build("QwenImageEditPlusPipeline"),
             _inputs("QwenImageEditPlusPipeline"), _TARGETS),
]
