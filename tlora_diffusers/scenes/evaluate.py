"""Measure what a scenes pipeline draws: the shipped evaluator, prompt following, IS/TS metrics."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from .data import ATTRIBUTES, BASE_SHAPES, Scene, render, sample_scene, scene_words
from .models import SceneEvaluator

__all__ = ["load_evaluator", "generate", "classify", "prompt_following", "to_model_input", "GUIDANCE", "STEPS"]

#: Sampling defaults of the scenes pipeline (DDIM, trailing spacing).
GUIDANCE = 4.0
STEPS = 20


def load_evaluator(folder: Union[str, Path]) -> SceneEvaluator:
    """The evaluator saved in a scenes weights folder (``evaluator.safetensors``), in eval mode."""
    from safetensors.torch import load_file

    model = SceneEvaluator()
    model.load_state_dict(load_file(str(Path(folder) / "evaluator.safetensors")))
    return model.eval().requires_grad_(False)


def to_model_input(images: Union[torch.Tensor, np.ndarray, Sequence[np.ndarray]]) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] from pipeline output (``output_type="pt"``, [0, 1]) or uint8 HWC arrays."""
    if isinstance(images, torch.Tensor):
        return images.float() * 2 - 1
    array = np.stack(list(images)) if not isinstance(images, np.ndarray) or images.ndim == 3 else images
    if array.ndim == 3:
        array = array[None]
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], seed: int, *, steps: int = STEPS, guidance: float = GUIDANCE,
             batch: int = 64) -> torch.Tensor:
    """``(N, 3, 32, 32)`` images in [0, 1], prompt ``i`` drawn with ``torch.Generator().manual_seed(seed + i)``."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i:i + batch])
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        out.append(pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                        generator=gens, output_type="pt").images.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def classify(evaluator: SceneEvaluator, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Predicted class index per attribute for images in [0, 1]."""
    logits = evaluator(to_model_input(images))
    return {a: v.argmax(-1) for a, v in logits.items()}


def prompt_following(pipe: Any, evaluator: SceneEvaluator, n: int = 256, seed: int = 0,
                     shapes: Sequence[str] = BASE_SHAPES, **sampling: Any) -> dict[str, Any]:
    """Accuracy per attribute on ``n`` random full captions, and on ``n`` one-attribute prompts.

    ``full``: the caption names all six attributes; each is read back by the evaluator.
    ``single``: the prompt names one attribute (``"a shape on a blue background"``); only it is scored.
    """
    rng = random.Random(seed)
    scenes = [sample_scene(rng, shapes) for _ in range(n)]
    images = generate(pipe, [scene_words(s) for s in scenes], seed, **sampling)
    pred = classify(evaluator, images)
    full = {a: round(float(np.mean([int(pred[a][i]) == s.labels()[a] for i, s in enumerate(scenes)])), 4)
            for a in ATTRIBUTES}
    single = {}
    names = list(ATTRIBUTES)
    singles = [(names[i % len(names)], sample_scene(rng, shapes)) for i in range(n)]
    prompts = [scene_words(s, [a]) for a, s in singles]
    pred = classify(evaluator, generate(pipe, prompts, seed + n, **sampling))
    for a in names:
        idx = [i for i, (b, _) in enumerate(singles) if b == a]
        single[a] = round(float(np.mean([int(pred[a][i]) == singles[i][1].labels()[a] for i in idx])), 4)
    return {"n": n, "full": full, "single": single, "min_full": min(full.values()), "min_single": min(single.values())}


def rendered(scenes: Sequence[Scene]) -> torch.Tensor:
    """Renders of ``scenes`` as ``(N, 3, 32, 32)`` in [0, 1] (the format :func:`generate` returns)."""
    return torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
