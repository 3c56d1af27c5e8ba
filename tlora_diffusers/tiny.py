"""Tiny offline pipelines by short name, for the demo, the app, the CLI tests and the benchmarks.

The builders live with their family in :mod:`tlora_diffusers.testing`; this module keeps
the short names (``"sdxl"``, ``"flux"``, ...) and the helpers that build a pipeline with
or without text encoders and invent matching prompt embeddings.

Example:
    >>> import torch
    >>> from tlora_diffusers.tiny import tiny_pipeline, tiny_prompt_embeds
    >>> pipe = tiny_pipeline("flux")
    >>> out = pipe(**tiny_prompt_embeds(pipe), num_inference_steps=4, height=64, width=64,
    ...            output_type="np", generator=torch.Generator().manual_seed(0))
    >>> out.images.shape
    (1, 64, 64, 3)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["KINDS", "tiny_pipeline", "tiny_prompt_embeds", "save_tiny_pipeline"]

KINDS: tuple[str, ...] = ("sdxl", "flux", "flux2-klein", "flux2", "sd3", "sd")


def _builders() -> dict[str, Callable[..., Any]]:
    from .testing import flux, flux2, sd3, stable_diffusion

    return {"sdxl": stable_diffusion.build_sdxl, "sd": stable_diffusion.build_sd, "flux": flux.build_flux,
            "flux2-klein": flux2.build_flux2_klein, "flux2": flux2.build_flux2, "sd3": sd3.build_sd3}


def _embedders() -> dict[str, Callable[..., dict]]:
    from .testing import flux, flux2, sd3, stable_diffusion

    return {"StableDiffusionXL": stable_diffusion.sdxl_embeds, "StableDiffusion3": sd3.sd3_embeds,
            "StableDiffusion": stable_diffusion.sd_embeds, "Flux2": flux2.flux2_embeds, "Flux": flux.flux_embeds}


def tiny_pipeline(kind: str, *, seed: int = 0, text_encoders: bool = False,
                  dtype: torch.dtype = torch.float32) -> Any:
    """A stock diffusers pipeline of ``kind`` around tiny random models, built offline.

    Every component is seeded separately, so the denoiser and VAE do not depend on
    ``text_encoders``; with ``text_encoders=False`` pass :func:`tiny_prompt_embeds`, with
    ``True`` a string prompt works. All modules are in ``eval()``.
    """
    builders = _builders()
    if kind not in builders:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {KINDS}")
    pipe = builders[kind](seed, text_encoders)
    if dtype != torch.float32:  # a no-op cast still logs a diffusers warning
        for value in pipe.components.values():
            if isinstance(value, torch.nn.Module):
                value.to(dtype=dtype)
    return pipe


def tiny_prompt_embeds(pipe: Any, batch_size: int = 1, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random text embeddings shaped for ``pipe``'s denoiser, as ``pipe(**kwargs)`` keywords."""
    name = type(pipe).__name__
    for prefix, embedder in _embedders().items():
        if name.startswith(prefix):
            return embedder(pipe, batch_size, seed)
    raise ValueError(f"no tiny embeddings for {name}; supported: {', '.join(_embedders())} pipelines")


def save_tiny_pipeline(kind: str, path: str | os.PathLike[str], *, text_encoders: bool = True, **kw: Any) -> Path:
    """Build ``tiny_pipeline(kind, text_encoders=text_encoders, **kw)`` and ``save_pretrained`` it.

    Saved with text encoders (the default), ``DiffusionPipeline.from_pretrained(path)`` reloads
    every kind offline and string prompts work.
    """
    path = Path(path)
    tiny_pipeline(kind, text_encoders=text_encoders, **kw).save_pretrained(path)
    return path
