"""The scenes model: a small text-to-image model trained here, shipped with the package.

32×32 images of one object (shape, colour, texture, size, position) on a background,
captioned with those words; a stock ``StableDiffusionPipeline`` (CLIP text encoder, 6.7 M
parameter UNet, 2× VAE) that ``DiffusionPipeline.from_pretrained`` loads offline, and a
small evaluator that reads every attribute back. The base model never saw the
:data:`~tlora_diffusers.scenes.data.NOVEL_SHAPES`: they are concepts to customise it with.

Example:
    >>> from tlora_diffusers.scenes import load_pipeline, load_evaluator, verify_weights
    >>> verify_weights()                      # SHA-256 of every shipped file
    >>> pipe = load_pipeline()                # StableDiffusionPipeline, float32, CPU
    >>> image = pipe("a large red striped circle at the top left on a white background",
    ...              num_inference_steps=20, guidance_scale=4.0, height=32, width=32).images[0]
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Union

from .data import ATTRIBUTES, BASE_SHAPES, NOVEL_SHAPES, Scene, render, sample_scene, scene_words

__all__ = ["WEIGHTS", "PIPELINE", "EXAMPLE_TLORA", "load_pipeline", "load_evaluator", "verify_weights", "Scene", "render",
           "sample_scene", "scene_words", "ATTRIBUTES", "BASE_SHAPES", "NOVEL_SHAPES"]

#: The shipped weights: ``pipeline/`` (a diffusers folder), ``evaluator.safetensors``, the training log, checksums.
WEIGHTS = Path(__file__).resolve().parent / "weights"
PIPELINE = WEIGHTS / "pipeline"
#: A T-LoRA of an unseen concept trained on the scenes model by ``tlora-diffusers demo`` (for the app).
EXAMPLE_TLORA = WEIGHTS / "examples" / "sks-shape-tlora.safetensors"


def verify_weights(folder: Union[str, Path] = WEIGHTS) -> None:
    """Check every file against ``SHA256SUMS``; a missing or changed file is an error naming it."""
    folder = Path(folder)
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise FileNotFoundError(f"{sums}: missing; the scenes weights are not installed in {folder}")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {sums} but missing")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != digest:
            raise ValueError(f"{path}: SHA-256 {actual} does not match {digest} in {sums} (a changed or corrupt file)")


def load_pipeline(folder: Union[str, Path] = PIPELINE, **kwargs: Any) -> Any:
    """The shipped model as a stock ``StableDiffusionPipeline`` (float32 unless ``dtype=`` says otherwise)."""
    import torch
    from diffusers import DiffusionPipeline

    kwargs.setdefault("dtype", torch.float32)
    pipe = DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_evaluator(folder: Union[str, Path] = WEIGHTS) -> Any:
    """The attribute classifier the experiment measures with (:class:`~tlora_diffusers.scenes.models.SceneEvaluator`)."""
    from .evaluate import load_evaluator as _load

    return _load(folder)
