"""Tiny Sana pipelines beyond ``SanaPipeline``: SANA-Sprint (text-to-image and img2img) and ControlNet.

SANA-Sprint runs the ``SCMScheduler`` (TrigFlow): ``scheduler.timesteps`` are angles in
``[0, pi/2]`` (``[pi/2, 1.3, 0]`` for the default 2 steps), the loop runs all but the final
0, and the transformer receives ``sin(t) / (sin(t) + cos(t))`` in ``[0, 1]``, unscaled (the
pipelines never read ``transformer.config.timestep_scale``), plus an embedded ``guidance``
(``guidance_embeds=True``, no CFG). ``SanaControlNetPipeline`` passes the integer DPM-Solver
``t`` unchanged to both the ``SanaControlNetModel`` and the transformer, CFG batched (2B); the
controlnet's zero-initialised projections get small random weights (:func:`unzero`) so that it
reaches the output.
Prompts are passed as Gemma embeddings with their masks, so no text encoder is built.
"""

from __future__ import annotations

from typing import Any

import torch

from . import TinyCase, seeded
from ._parts import LATENT_CHANNELS, finish, randn, unzero
from .sana import _CAPTION_DIM, _TARGETS, _TEXT_LEN, _scheduler, _vae

__all__ = ["CASES"]


def _transformer(*, sprint: bool):
    from diffusers import SanaTransformer2DModel

    extra = {"guidance_embeds": True, "qk_norm": "rms_norm_across_heads"} if sprint else {}
    return SanaTransformer2DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=8,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=_CAPTION_DIM, sample_size=8, patch_size=1, **extra,
    )


def _scm():
    """SANA-Sprint's scheduler (the converted checkpoints' config): TrigFlow, sigma_data 0.5."""
    from diffusers import SCMScheduler

    return SCMScheduler(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)


def _build(pipeline: str):
    def build(seed: int) -> Any:
        import diffusers

        def make():
            parts: dict[str, Any] = {"tokenizer": None, "text_encoder": None, "vae": _vae()}
            if pipeline == "SanaControlNetPipeline":
                controlnet = diffusers.SanaControlNetModel(
                    in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2,
                    attention_head_dim=8, num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                    cross_attention_dim=16, caption_channels=_CAPTION_DIM, sample_size=8, patch_size=1,
                )
                parts.update(transformer=_transformer(sprint=False), scheduler=_scheduler(),
                             controlnet=unzero(controlnet))
            else:
                parts.update(transformer=_transformer(sprint=True), scheduler=_scm())
            return getattr(diffusers, pipeline)(**parts)

        return finish(seeded(seed, make))

    return build


def _image(g: torch.Generator) -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=g)


def _inputs(*, sprint: bool, image: bool = False, control: bool = False):
    def inputs(pipe: Any, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        kwargs: dict[str, Any] = {
            "prompt_embeds": randn(g, 1, _TEXT_LEN, _CAPTION_DIM),
            "prompt_attention_mask": torch.ones(1, _TEXT_LEN, dtype=torch.long),
            "use_resolution_binning": False, "height": 32, "width": 32, "num_inference_steps": 2,
            "output_type": "latent", "generator": torch.Generator().manual_seed(seed),
        }
        if not sprint:  # CFG in one doubled batch
            kwargs.update(negative_prompt_embeds=randn(g, 1, _TEXT_LEN, _CAPTION_DIM),
                          negative_prompt_attention_mask=torch.ones(1, _TEXT_LEN, dtype=torch.long),
                          negative_prompt=None, guidance_scale=4.5)
        if image:
            # 3 linear angles [pi/2, pi/3, pi/6, 0]; strength 0.6 starts at index 1: two steps run.
            # `intermediate_timesteps` must be None for any step count but 2.
            kwargs.update(image=_image(g), strength=0.6, num_inference_steps=3, intermediate_timesteps=None)
        if control:
            kwargs["control_image"] = _image(g)
        return kwargs

    return inputs


CASES = [
    TinyCase("sana-sprint", "sana", "SanaSprintPipeline", _build("SanaSprintPipeline"), _inputs(sprint=True),
             _TARGETS),
    TinyCase("sana-sprint-img2img", "sana", "SanaSprintImg2ImgPipeline", _build("SanaSprintImg2ImgPipeline"),
             _inputs(sprint=True, image=True), _TARGETS),
    TinyCase("sana-controlnet", "sana", "SanaControlNetPipeline", _build("SanaControlNetPipeline"),
             _inputs(sprint=False, control=True), _TARGETS, ("transformer", "controlnet")),
]
