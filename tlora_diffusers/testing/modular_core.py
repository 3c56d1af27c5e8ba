"""Tiny modular pipelines (``diffusers.modular_pipelines``) of the families that have classic cases: SDXL
(text-to-image, img2img, ControlNet), SD3, FLUX.1 and Kontext, FLUX.2 [dev] / [klein] / [klein] base, Z-Image,
Qwen-Image (text-to-image, Edit, Edit Plus, Layered) and LTX-Video (text- and image-to-video).

Each pipeline is the stock modular pipeline class built from a deep copy of its stock auto blocks
(some nested steps are shared instances) minus the text-encoder step (prompts are passed as
embeddings), the ``decode`` step (the call returns ``output="latents"``) and, except for the SDXL
img2img and LTX image-to-video cases, the VAE-encode step (image-conditioned cases pass
``image_latents``). The denoisers, schedulers and embeddings are the classic tiny cases' own
(:mod:`.stable_diffusion`, :mod:`.sd3`, :mod:`.flux`, :mod:`.flux2`, :mod:`.z_image`,
:mod:`.qwen_image`, :mod:`.ltx_video`); Qwen-Image-Layered's transformer is the Qwen-Image one
with ``use_additional_t_cond`` and ``use_layer3d_rope``.

Where the loop timestep is kept differs from the classic pipelines: no modular pipeline sets
``_current_timestep``; the blocks with a guider call ``guider.set_state(step=i, ..., timestep=t)``
before their denoiser calls (CFG is two separate batch-1 calls, conditional first); FLUX.1, Kontext,
FLUX.2 [dev] and [klein] have no guider (guidance-distilled, one call per step), so there the loop
``t`` is only ``scheduler.timesteps[step_index]`` (``step_index`` is ``None`` on the first call:
``begin_index``, 0). Z-Image's default guider is disabled (Turbo); the case enables CFG 5.0 like the
classic case. LTX image-to-video passes per-token timesteps (``(B, tokens)``, 0 on the first frame).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, TEXT_LEN, finish, flow_scheduler, randn, vae
from .flux import LORA_TARGETS as _FLUX_TARGETS
from .flux import flux_embeds, flux_transformer
from .flux2 import LORA_TARGETS as _FLUX2_TARGETS
from .flux2 import flux2_transformer
from .ltx_video import _LORA_TARGETS as _LTX_TARGETS
from .ltx_video import _TEXT_DIM as _LTX_TEXT_DIM
from .ltx_video import _scheduler as _ltx_scheduler
from .ltx_video import _transformer as _ltx_transformer
from .ltx_video import _vae as _ltx_vae
from .qwen_image import _JOINT_DIM as _QWEN_TEXT_DIM
from .qwen_image import _TARGETS as _QWEN_TARGETS
from .qwen_image import _TEXT_LEN as _QWEN_TEXT_LEN
from .qwen_image import _Z_DIM as _QWEN_Z_DIM
from .qwen_image import _scheduler as _qwen_scheduler
from .qwen_image import _transformer as _qwen_transformer
from .sd3 import LORA_TARGETS as _SD3_TARGETS
from .sd3 import sd3_embeds, sd3_transformer
from .stable_diffusion import LORA_TARGETS as _SD_TARGETS
from .stable_diffusion import _euler, sdxl_embeds, sdxl_unet
from .z_image import _CAP_DIM as _Z_IMAGE_TEXT_DIM
from .z_image import _TARGETS as _Z_IMAGE_TARGETS
from .z_image import _TEXT_LEN as _Z_IMAGE_TEXT_LEN
from .z_image import _build as _z_image_classic

__all__ = ["CASES"]

_SIZE = 64  # pixels: 8x VAEs (or no VAE: the pipelines' default factor 8) -> 8x8 latents
_QWEN_SIZE = 32  # Qwen-Image without a VAE (factor 8, as the checkpoints'): 4x4 latents, 2x2 tokens per image
_NO_ENCODERS = ("text_encoder", "vae_encoder", "decode")


def _quiet(blocks: Any) -> None:
    """``ModularPipeline.set_progress_bar_config`` only reaches top-level blocks; the loops are nested."""
    for block in (getattr(blocks, "sub_blocks", None) or {}).values():
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        _quiet(block)


def _modular(pipeline: str, components: dict, drop: tuple[str, ...] = _NO_ENCODERS) -> Any:
    """The stock pipeline on a deep copy of its default blocks minus the top-level steps ``drop``."""
    import diffusers
    from diffusers import modular_pipelines

    cls = getattr(diffusers, pipeline)
    blocks = copy.deepcopy(getattr(modular_pipelines, cls.default_blocks_name)())
    for name in drop:
        blocks.sub_blocks.pop(name)
    pipe = cls(blocks=blocks)  # creates the from_config components (guider, image processors, pachifier)
    pipe.update_components(**components)
    _quiet(pipe._blocks)
    return finish(pipe)


def _like(module: torch.nn.Module) -> torch.Tensor:
    ref = next(module.parameters())
    return torch.empty(0, dtype=ref.dtype, device=ref.device)


def _common(seed: int, size: int = _SIZE) -> dict:
    return {"height": size, "width": size, "num_inference_steps": 2, "generator": torch.Generator().manual_seed(seed),
            "output": "latents"}


# ----------------------------------------------------------------------------------------- SDXL


def _controlnet(unet: torch.nn.Module) -> torch.nn.Module:
    """An SDXL ControlNet from the UNet with its zero convolutions made non-zero: zero-initialised, they would
    discard the ControlNet's output, and with it any effect of a (wrongly or rightly masked) LoRA on it."""
    from diffusers import ControlNetModel

    zero = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")
    controlnet = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(zero):
                p.copy_(torch.randn_like(p) * 0.1)
    return controlnet


def _build_sdxl(*, controlnet: bool = False, image: bool = False):
    def build(seed: int) -> Any:
        components: dict[str, Any] = {"unet": seeded(seed, sdxl_unet), "scheduler": _euler()}
        if image:  # img2img: the stock VAE-encode step runs on the image
            components["vae"] = seeded(seed, lambda: vae(scaling_factor=0.13025, shift_factor=None, quant_conv=True))
        if controlnet:
            components["controlnet"] = seeded(seed + 1, lambda: _controlnet(components["unet"]))
        drop = ("text_encoder", "ip_adapter", "decode") + (() if image else ("vae_encoder",))
        return _modular("StableDiffusionXLModularPipeline", components, drop)

    return build


def _sdxl_inputs(*, controlnet: bool = False, image: bool = False):
    def inputs(pipe: Any, seed: int) -> dict:
        kwargs = {**sdxl_embeds(pipe, seed=seed), **_common(seed)}  # with negatives: CFG 7.5
        g = torch.Generator().manual_seed(seed + 100)
        if image:  # strength 0.75 of 3 steps: the last 2 of the schedule run
            kwargs.update(image=torch.rand(1, 3, _SIZE, _SIZE, generator=g), strength=0.75, num_inference_steps=3)
        if controlnet:
            kwargs["control_image"] = torch.rand(1, 3, _SIZE, _SIZE, generator=g)
        return kwargs

    return inputs


# ------------------------------------------------------------------------------------------ SD3


def _build_sd3(seed: int) -> Any:
    return _modular("StableDiffusion3ModularPipeline",
                    {"transformer": seeded(seed, sd3_transformer), "scheduler": flow_scheduler(dynamic=False)})


def _sd3_inputs(pipe: Any, seed: int) -> dict:
    return {**sd3_embeds(pipe, seed=seed), **_common(seed)}  # with negatives: CFG 7.0


# ---------------------------------------------------------------------------------------- FLUX.1


def _build_flux(pipeline: str):
    def build(seed: int) -> Any:
        return _modular(pipeline, {"transformer": seeded(seed, flux_transformer),
                                   "scheduler": flow_scheduler(dynamic=True)})

    return build


def _flux_inputs(*, kontext: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        kwargs = {**flux_embeds(pipe, seed=seed), **_common(seed)}
        if kontext:  # the reference image's VAE latents (packed next to the noise); keep the output at 64x64
            g = torch.Generator().manual_seed(seed + 100)
            side = _SIZE // 8
            kwargs.update(image_latents=randn(g, 1, LATENT_CHANNELS, side, side, like=_like(pipe.transformer)),
                          max_area=_SIZE * _SIZE)
        return kwargs

    return inputs


# ---------------------------------------------------------------------------------------- FLUX.2


def _build_flux2(pipeline: str, *, guidance_embeds: bool):
    def build(seed: int) -> Any:
        transformer = seeded(seed, lambda: flux2_transformer(guidance_embeds=guidance_embeds))
        return _modular(pipeline, {"transformer": transformer, "scheduler": flow_scheduler(dynamic=True)})

    return build


def _flux2_inputs(*, negative: bool):
    def inputs(pipe: Any, seed: int) -> dict:
        dim = pipe.transformer.config.joint_attention_dim
        g = torch.Generator().manual_seed(seed)
        like = _like(pipe.transformer)
        kwargs = {"prompt_embeds": randn(g, 1, TEXT_LEN, dim, like=like), **_common(seed)}
        if negative:  # [klein] base: CFG 4.0
            kwargs["negative_prompt_embeds"] = randn(g, 1, TEXT_LEN, dim, like=like)
        return kwargs

    return inputs


# --------------------------------------------------------------------------------------- Z-Image


def _build_z_image(seed: int) -> Any:
    from diffusers import ClassifierFreeGuidance
    from diffusers.modular_pipelines import ComponentSpec

    classic = _z_image_classic(seed)  # the classic case's transformer and scheduler
    # The blocks' default guider is CFG 5.0 but disabled (Z-Image Turbo); the classic case runs CFG 5.0.
    guider = ComponentSpec("guider", ClassifierFreeGuidance, config={"guidance_scale": 5.0, "enabled": True},
                           default_creation_method="from_config").create()
    return _modular("ZImageModularPipeline",
                    {"transformer": classic.transformer, "scheduler": classic.scheduler, "guider": guider})


def _z_image_inputs(pipe: Any, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    like = _like(pipe.transformer)
    return {"prompt_embeds": [randn(g, _Z_IMAGE_TEXT_LEN, _Z_IMAGE_TEXT_DIM, like=like)],
            "negative_prompt_embeds": [randn(g, _Z_IMAGE_TEXT_LEN, _Z_IMAGE_TEXT_DIM, like=like)], **_common(seed)}


# ------------------------------------------------------------------------------------ Qwen-Image


def _layered_transformer():
    """Qwen-Image-Layered: the Qwen-Image transformer plus the is-RGB embedding and the layer-3D RoPE."""
    from diffusers import QwenImageTransformer2DModel

    config = {**_qwen_transformer().config, "use_additional_t_cond": True, "use_layer3d_rope": True}
    return QwenImageTransformer2DModel.from_config(config)


def _build_qwen(pipeline: str, *, layered: bool = False):
    def build(seed: int) -> Any:
        make = _layered_transformer if layered else _qwen_transformer
        return _modular(pipeline, {"transformer": seeded(seed, make), "scheduler": _qwen_scheduler()})

    return build


def _qwen_inputs(*, images: int = 0, layered: bool = False):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = _like(pipe.transformer)
        ones = torch.ones(1, _QWEN_TEXT_LEN, dtype=torch.long, device=like.device)
        kwargs = {"prompt_embeds": randn(g, 1, _QWEN_TEXT_LEN, _QWEN_TEXT_DIM, like=like), "prompt_embeds_mask": ones,
                  "negative_prompt_embeds": randn(g, 1, _QWEN_TEXT_LEN, _QWEN_TEXT_DIM, like=like),
                  "negative_prompt_embeds_mask": ones.clone(), **_common(seed, _QWEN_SIZE)}  # CFG 4.0
        side = _QWEN_SIZE // pipe.vae_scale_factor
        if layered:  # the input image's latents, (B, 1, C, H, W) after the encoder's permute; 2 output layers + 1
            kwargs.update(layers=2, image_latents=randn(g, 1, 1, _QWEN_Z_DIM, side, side, like=like))
        elif images:  # Edit: one (B, C, 1, H, W) tensor; Edit Plus: a list of them
            latents = [randn(g, 1, _QWEN_Z_DIM, 1, side, side, like=like) for _ in range(images)]
            kwargs["image_latents"] = latents if images > 1 else latents[0]
        return kwargs

    return inputs


# ------------------------------------------------------------------------------------- LTX-Video


def _build_ltx(seed: int) -> Any:
    # The VAE stays: the image-to-video case runs the stock VAE-encode step (32x32 -> one latent token).
    return _modular("LTXModularPipeline", {"transformer": seeded(seed, _ltx_transformer), "vae": seeded(seed, _ltx_vae),
                                           "scheduler": _ltx_scheduler()}, drop=("text_encoder", "decode"))


def _ltx_inputs(*, image: bool, frames: int):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        like = _like(pipe.transformer)
        mask = torch.ones(1, TEXT_LEN, dtype=torch.long, device=like.device)
        kwargs = {"prompt_embeds": randn(g, 1, TEXT_LEN, _LTX_TEXT_DIM, like=like), "prompt_attention_mask": mask,
                  "negative_prompt_embeds": randn(g, 1, TEXT_LEN, _LTX_TEXT_DIM, like=like),
                  "negative_prompt_attention_mask": mask.clone(), **_common(seed, 32), "num_frames": frames}
        if image:
            kwargs["image"] = torch.rand(1, 3, 32, 32, generator=g)
        return kwargs

    return inputs


CASES = [
    TinyCase("sdxl-modular", "stable-diffusion", "StableDiffusionXLModularPipeline", _build_sdxl(), _sdxl_inputs(),
             _SD_TARGETS, ("unet",)),
    TinyCase("sdxl-modular-img2img", "stable-diffusion", "StableDiffusionXLModularPipeline", _build_sdxl(image=True),
             _sdxl_inputs(image=True), _SD_TARGETS, ("unet",)),
    TinyCase("sdxl-modular-controlnet", "stable-diffusion", "StableDiffusionXLModularPipeline",
             _build_sdxl(controlnet=True), _sdxl_inputs(controlnet=True), _SD_TARGETS, ("unet", "controlnet")),
    TinyCase("sd3-modular", "sd3", "StableDiffusion3ModularPipeline", _build_sd3, _sd3_inputs, _SD3_TARGETS),
    TinyCase("flux-modular", "flux", "FluxModularPipeline", _build_flux("FluxModularPipeline"),
             _flux_inputs(kontext=False), _FLUX_TARGETS),
    TinyCase("flux-kontext-modular", "flux", "FluxKontextModularPipeline", _build_flux("FluxKontextModularPipeline"),
             _flux_inputs(kontext=True), _FLUX_TARGETS),
    TinyCase("flux2-modular", "flux2", "Flux2ModularPipeline",
             _build_flux2("Flux2ModularPipeline", guidance_embeds=True), _flux2_inputs(negative=False), _FLUX2_TARGETS),
    TinyCase("flux2-klein-modular", "flux2", "Flux2KleinModularPipeline",
             _build_flux2("Flux2KleinModularPipeline", guidance_embeds=False), _flux2_inputs(negative=False),
             _FLUX2_TARGETS),
    TinyCase("flux2-klein-base-modular", "flux2", "Flux2KleinBaseModularPipeline",
             _build_flux2("Flux2KleinBaseModularPipeline", guidance_embeds=False), _flux2_inputs(negative=True),
             _FLUX2_TARGETS),
    TinyCase("z-image-modular", "z-image", "ZImageModularPipeline", _build_z_image, _z_image_inputs, _Z_IMAGE_TARGETS),
    TinyCase("qwen-image-modular", "qwen-image", "QwenImageModularPipeline", _build_qwen("QwenImageModularPipeline"),
             _qwen_inputs(), _QWEN_TARGETS),
    TinyCase("qwen-image-edit-modular", "qwen-image", "QwenImageEditModularPipeline",
             _build_qwen("QwenImageEditModularPipeline"), _qwen_inputs(images=1), _QWEN_TARGETS),
    TinyCase("qwen-image-edit-plus-modular", "qwen-image", "QwenImageEditPlusModularPipeline",
             _build_qwen("QwenImageEditPlusModularPipeline"), _qwen_inputs(images=2), _QWEN_TARGETS),
    TinyCase("qwen-image-layered-modular", "qwen-image", "QwenImageLayeredModularPipeline",
             _build_qwen("QwenImageLayeredModularPipeline", layered=True), _qwen_inputs(layered=True), _QWEN_TARGETS),
    TinyCase("ltx-video-modular", "ltx-video", "LTXModularPipeline", _build_ltx, _ltx_inputs(image=False, frames=9),
             _LTX_TARGETS),
    # 17 frames: 3 latent frames, the first one the encoded image (timestep 0 on its tokens).
    TinyCase("ltx-video-modular-i2v", "ltx-video", "LTXModularPipeline", _build_ltx, _ltx_inputs(image=True, frames=17),
             _LTX_TARGETS, per_token=True),
]
