"""Tiny Z-Image pipelines beyond ``ZImagePipeline``: img2img, ControlNet, ControlNet inpaint and Omni.

All pass ``(1000 - t) / 1000`` (1 = clean) as the second positional argument ``t``, CFG in one
batched call (``2B``). ``ZImageControlNetModel`` gets the same ``t`` and *shares* the
transformer's ``t_embedder``, embedders and noise/context refiners
(``ZImageControlNetModel.from_transformer``, run by the pipelines' ``__init__``): the test LoRA
goes on the transformer only (a second adapter on the controlnet would land on the same shared
refiner layers), and those LoRA layers also run inside every controlnet call, which comes
*before* the transformer call of the same step. The controlnet's zero-initialised ``before_proj``/``after_proj``
are given small random weights so that the control branch, and a LoRA on it, reach the output.
Omni runs the transformer in "omni mode" (nested lists): reference-image tokens are modulated
at ``t = 1`` (clean), the generated image at ``t``, with SigLIP2 features of the reference.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, finish, randn, vae
from .z_image import _CAP_DIM, _TARGETS, _TEXT_LEN

__all__ = ["CASES"]

_SIGLIP_DIM = 16


def _transformer(siglip_feat_dim: int | None = None):
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=LATENT_CHANNELS, dim=32, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=_CAP_DIM,
        siglip_feat_dim=siglip_feat_dim, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )


def _controlnet(control_in_dim: int, refiner: str | None):
    from diffusers import ZImageControlNetModel

    net = ZImageControlNetModel(
        control_layers_places=[0, 1], control_refiner_layers_places=[0], control_in_dim=control_in_dim,
        add_control_noise_refiner=refiner, all_patch_size=(2,), all_f_patch_size=(1,), dim=32,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
    )
    with torch.no_grad():
        for name, module in net.named_modules():
            if name.endswith(("before_proj", "after_proj")):
                module.weight.normal_(std=0.2)
    return net


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def _siglip():
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    return Siglip2VisionModel(Siglip2VisionConfig(
        hidden_size=_SIGLIP_DIM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=8,
        num_patches=16,
    ))


def _siglip_processor():
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    return Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)  # no torchvision needed


def _build(pipeline: str):
    def build(seed: int) -> Any:
        import diffusers

        def make():
            parts: dict[str, Any] = {
                "vae": vae(scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False),
                "scheduler": _scheduler(), "text_encoder": None, "tokenizer": None,
            }
            if pipeline == "ZImageOmniPipeline":
                parts.update(transformer=_transformer(_SIGLIP_DIM), siglip=_siglip(),
                             siglip_processor=_siglip_processor())
                # The pipeline encodes reference images with `image.bfloat16()` whatever the VAE's dtype.
                parts["vae"] = parts["vae"].to(torch.bfloat16)
            else:
                parts["transformer"] = _transformer()
            if pipeline == "ZImageControlNetPipeline":
                parts["controlnet"] = _controlnet(LATENT_CHANNELS, None)
            elif pipeline == "ZImageControlNetInpaintPipeline":
                # Union 2.1-style: control latents + mask + masked-image latents, control noise refiner.
                parts["controlnet"] = _controlnet(2 * LATENT_CHANNELS + 1, "control_noise_refiner")
            return getattr(diffusers, pipeline)(**parts)

        return finish(seeded(seed, make))

    return build


def _pil(g: torch.Generator, size: int = 64):
    from PIL import Image

    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())


def _mask():
    from PIL import Image

    mask = torch.zeros(64, 64, dtype=torch.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask.numpy())


def _inputs(*, image: bool = False, control: bool = False, mask: bool = False, omni: bool = False):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        embeds = [randn(g, _TEXT_LEN, _CAP_DIM)], [randn(g, _TEXT_LEN, _CAP_DIM)]
        if omni:  # one list of caption segments per prompt (one more than reference images)
            embeds = [[randn(g, 4, _CAP_DIM), randn(g, _TEXT_LEN, _CAP_DIM), randn(g, 2, _CAP_DIM)]], \
                     [[randn(g, 4, _CAP_DIM), randn(g, _TEXT_LEN, _CAP_DIM), randn(g, 2, _CAP_DIM)]]
        kwargs: dict[str, Any] = {
            "prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1], "guidance_scale": 5.0,
            "height": 64, "width": 64, "num_inference_steps": 2, "output_type": "latent",
            "generator": torch.Generator().manual_seed(seed),
        }
        if image:  # img2img: 3 steps, strength 0.6 runs the last 2
            kwargs.update(image=_pil(g), strength=0.6, num_inference_steps=3)
        if control:
            kwargs["control_image"] = _pil(g)
        if mask:
            kwargs.update(image=_pil(g), mask_image=_mask())
        if omni:
            kwargs["image"] = [_pil(g)]  # at least 64x64
        return kwargs

    return inputs


CASES = [
    TinyCase("z-image-img2img", "z-image", "ZImageImg2ImgPipeline", _build("ZImageImg2ImgPipeline"),
             _inputs(image=True), _TARGETS),
    TinyCase("z-image-controlnet", "z-image", "ZImageControlNetPipeline", _build("ZImageControlNetPipeline"),
             _inputs(control=True), _TARGETS),
    TinyCase("z-image-controlnet-inpaint", "z-image", "ZImageControlNetInpaintPipeline",
             _build("ZImageControlNetInpaintPipeline"), _inputs(control=True, mask=True), _TARGETS),
    TinyCase("z-image-omni", "z-image", "ZImageOmniPipeline", _build("ZImageOmniPipeline"), _inputs(omni=True),
             _TARGETS),
]
