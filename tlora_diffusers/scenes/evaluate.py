"""Measure what a scenes pipeline draws: the shipped evaluator, prompt following, IS/TS metrics."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from .data import ATTRIBUTES, BASE_SHAPES, Scene, render, sample_scene, scene_words
from .models import SceneEvaluator

__all__ = ["load_evaluator", "generate", "classify", "prompt_following", "to_model_input", "rendered", "GUIDANCE", "STEPS",
           "SUBJECT", "concept_scene", "customization_prompts", "customization_metrics", "saturation"]

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


# -- single-image customisation: the paper's metrics, measured with the evaluator -------------------

#: The DreamBooth-style subject of a customisation prompt ("a sks shape ...").
SUBJECT = "sks shape"


def concept_scene(seed: int) -> Scene:
    """The concept of experiment seed ``seed``: a novel shape the base never saw, in a fixed training context."""
    from .data import COLOURS, NOVEL_SHAPES

    rng = random.Random(seed)
    shape = NOVEL_SHAPES[seed % len(NOVEL_SHAPES)]
    colour = rng.choice([c for c in COLOURS if c != "blue"])
    return Scene(shape=shape, colour=colour, texture="striped", size="large", position="top left",
                 background="white")


def customization_prompts(concept: Scene, samples: int = 4) -> list[dict]:
    """The training prompt, and prompts that change the context (background, position) of the concept.

    Each item: ``prompt``, ``changed`` (the attribute the prompt asks for, or ``None``), ``value``.
    """
    from .data import BACKGROUNDS, POSITIONS

    items = [{"prompt": f"a {SUBJECT}", "changed": None, "value": None}]
    for bg in BACKGROUNDS:
        if bg not in (concept.background, concept.colour):
            items.append({"prompt": f"a {SUBJECT} on a {bg} background", "changed": "background", "value": bg})
    for pos in POSITIONS:
        if pos != concept.position:
            words = "in the center" if pos == "center" else f"at the {pos}"
            items.append({"prompt": f"a {SUBJECT} {words}", "changed": "position", "value": pos})
    return [dict(item, sample=i) for item in items for i in range(samples)]


@torch.no_grad()
def customization_metrics(evaluator: SceneEvaluator, images: torch.Tensor, items: Sequence[dict],
                          concept: Scene) -> dict[str, float]:
    """IS, TS, memorisation and diversity of samples ``images`` ([0, 1]) drawn for ``items``.

    * ``IS``: mean cosine similarity of the evaluator's concept embedding (shape, colour and
      texture heads) between each sample and the training image (the paper's CLIP-I/DINO role);
    * ``TS``: accuracy of the attribute each context prompt changes (its CLIP-T role);
    * ``copy_rate``: share of context samples that kept the training image's value of the
      attribute they were asked to change (memorisation of the context);
    * ``distance``: mean pixel MSE to the training image (lower: closer to a copy);
    * ``diversity``: mean pairwise pixel MSE between samples of the same prompt;
    * ``concept``: share of samples whose shape, colour and texture all match the concept.
    """
    train = rendered([concept])
    x = to_model_input(images)
    emb = evaluator.concept_embedding(x)
    ref = evaluator.concept_embedding(to_model_input(train))
    sims = (emb @ ref.T).squeeze(-1)
    logits = evaluator(x)
    pred = {a: v.argmax(-1) for a, v in logits.items()}
    labels = concept.labels()
    context = [i for i, it in enumerate(items) if it["changed"]]
    hits = [int(pred[items[i]["changed"]][i]) == ATTRIBUTES[items[i]["changed"]].index(items[i]["value"]) for i in context]
    copies = [int(pred[items[i]["changed"]][i]) == labels[items[i]["changed"]] for i in context]
    concept_ok = [(int(pred["shape"][i]) == labels["shape"] and int(pred["colour"][i]) == labels["colour"]
                   and int(pred["texture"][i]) == labels["texture"]) for i in range(len(items))]
    distance = ((images - train) ** 2).mean(dim=(1, 2, 3))
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it["prompt"], []).append(i)
    pairs = []
    for idx in groups.values():
        flat = images[idx].reshape(len(idx), -1)
        d = torch.cdist(flat, flat) ** 2 / flat.shape[1]
        pairs += d[torch.triu_indices(len(idx), len(idx), 1).unbind()].tolist()
    return {"IS": float(sims.mean()), "TS": float(np.mean(hits)), "copy_rate": float(np.mean(copies)),
            "distance": float(distance.mean()), "diversity": float(np.mean(pairs)) if pairs else 0.0,
            "concept": float(np.mean(concept_ok)), "n": len(items)}


def saturation(images: torch.Tensor) -> float:
    """Mean HSV saturation of images in [0, 1]: over-saturated ("burnt") samples score high."""
    mx, mn = images.amax(dim=1), images.amin(dim=1)
    return float(torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-8), torch.zeros_like(mx)).mean())
