"""Tiny Stable Diffusion 3 ControlNet pipeline.

``StableDiffusion3ControlNetPipeline`` passes the scheduler's ``t`` unchanged (``t.expand(2B)``,
CFG batched) to the ``SD3ControlNetModel`` and then to the transformer. The controlnet here is
the InstantX SD3 kind (its own ``pos_embed`` and context embedder, zero pooled projection);
its zero-initialised projections get small random weights so that it reaches the output.
The pipeline encodes the control image with ``latent_dist.sample()`` *without* the generator
(``pipeline_stable_diffusion_3_controlnet.py:1077``), so ``inputs`` seeds the global RNG to make
two runs identical.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import finish, flow_scheduler, unzero, vae
from .sd3 import LORA_TARGETS, sd3_embeds, sd3_transformer

__all__ = ["CASES"]


def _controlnet():
    from diffusers import SD3ControlNetModel

    config = dict(sd3_transformer().config)
    return unzero(SD3ControlNetModel(
        sample_size=config["sample_size"], patch_size=2, in_channels=config["in_channels"], num_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=config["joint_attention_dim"],
        caption_projection_dim=config["caption_projection_dim"],
        pooled_projection_dim=config["pooled_projection_dim"], out_channels=config["out_channels"],
        pos_embed_max_size=config["pos_embed_max_size"], force_zeros_for_pooled_projection=True,
    ))


def _build(seed: int) -> Any:
    from diffusers import StableDiffusion3ControlNetPipeline

    return finish(StableDiffusion3ControlNetPipeline(
        transformer=seeded(seed, sd3_transformer), controlnet=seeded(seed + 1, _controlnet),
        vae=seeded(seed, lambda: vae(scaling_factor=1.5305, shift_factor=0.0609, quant_conv=False)),
        scheduler=flow_scheduler(dynamic=False), text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    ))


def _inputs(pipe: Any, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)  # the control image's VAE sample draws from the global RNG
    control = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed + 100))
    return {**sd3_embeds(pipe, seed=seed), "control_image": control, "num_inference_steps": 2, "height": 64,
            "width": 64, "output_type": "latent", "generator": torch.Generator().manual_seed(seed)}


CASES = [TinyCase("sd3-controlnet", "sd3", "StableDiffusion3ControlNetPipeline", _build, _inputs, LORA_TARGETS,
                  ("transformer", "controlnet"))]
