"""The offline demo: train a T-LoRA on one generated image and compare masked, unmasked and base.

Everything runs locally: a small SDXL-style pipeline is built from configs (or read from
``model``), trained on one generated concept image, saved, loaded back into the *stock*
pipeline with ``load_lora_weights``, and sampled three ways with the same seeds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["run_demo", "concept_image"]

PROMPTS = ("a photo of sks ball", "a painting of a sks ball")


def concept_image(size: int = 64):
    """A red ball with a highlight on a blue-green background: the 'sks ball' concept."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (40, 110, 140))
    draw = ImageDraw.Draw(img)
    m = size // 6
    draw.ellipse((m, m, size - m, size - m), fill=(210, 40, 35))
    h = size // 3
    draw.ellipse((h, h, h + size // 8, h + size // 8), fill=(250, 200, 190))
    return img


def _saturation(images: Sequence[np.ndarray]) -> float:
    """Mean HSV saturation in [0, 1]: over-saturated ('burnt') images score high."""
    x = np.stack(images).astype(np.float64)
    mx, mn = x.max(-1), x.min(-1)
    return float(np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-8), 0).mean())


def run_demo(
    out_dir: Union[str, Path] = "tlora-demo",
    *,
    model: Optional[Union[str, Path]] = None,
    steps: int = 200,
    rank: int = 8,
    min_rank: int = 1,
    alpha: float = 1.0,
    learning_rate: float = 5e-3,
    resolution: int = 64,
    sample_steps: int = 25,
    prompts: Sequence[str] = PROMPTS,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole demo; returns (and writes as ``summary.json``) what it did and where files went."""
    from diffusers import DiffusionPipeline

    from .config import TLoRAConfig
    from .patch import TLoRAPatch
    from .plot import image_grid, rank_schedule_figure, save_figure
    from .tiny import save_tiny_pipeline
    from .training import TrainConfig, train

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = out / "model"
        if not (model / "model_index.json").is_file():
            save_tiny_pipeline("sdxl", model, seed=seed)
    model = Path(model)
    concept = out / "concept.png"
    concept_image(resolution).save(concept)

    cfg = TrainConfig(model=str(model), images=[str(concept)], prompt=prompts[0], output_dir=str(out / "tlora"),
                      resolution=resolution, steps=steps, learning_rate=learning_rate, rank=rank, min_rank=min_rank,
                      alpha=alpha, seed=seed, overwrite=True, progress=progress)
    t_train = time.perf_counter()
    result = train(cfg)
    train_seconds = time.perf_counter() - t_train

    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=not progress, desc="sampling")

    def sample() -> list[np.ndarray]:
        return [pipe(prompt=p, num_inference_steps=sample_steps, height=resolution, width=resolution,
                     output_type="np", generator=torch.Generator().manual_seed(seed + i)).images[0]
                for i, p in enumerate(prompts)]

    t_sample = time.perf_counter()
    with torch.no_grad():
        base = sample()
        pipe.load_lora_weights(str(out / "tlora"))  # stock diffusers
        unmasked = sample()  # the LoRA at full rank on every step: what a T-LoRA without its mask does
        with TLoRAPatch(pipe) as patch:  # the config comes from the file
            masked = sample()
    sample_seconds = time.perf_counter() - t_sample

    to_pil = pipe.image_processor.numpy_to_pil
    rows = [("T-LoRA, masked", masked), ("same LoRA, no mask", unmasked), ("base model", base)]
    tiles, labels = [], []
    for name, images in rows:
        tiles += [im.resize((192, 192)) for im in to_pil(np.stack(images))]
        labels += [f"{name} #{i + 1}" for i in range(len(prompts))]
    grid = image_grid(tiles, labels, cols=len(prompts))
    grid_path = out / "grid.png"
    grid.save(grid_path)
    schedule_path = save_figure(
        rank_schedule_figure(patch.config, sampling_timesteps=pipe.scheduler.timesteps.tolist(),
                             title="T-LoRA active rank per timestep"), out / "schedule.png")

    summary = {
        "output_dir": str(out),
        "model": str(model),
        "config": patch.config.to_dict(),
        "train": {"steps": steps, "learning_rate": learning_rate, "seconds": round(train_seconds, 2),
                  "loss_curve": [round(v, 5) for v in result.losses],
                  "probe_loss_start": result.probe_loss_start, "probe_loss_end": result.probe_loss_end},
        "sampling": {"prompts": list(prompts), "steps": sample_steps, "seconds": round(sample_seconds, 2),
                     "timesteps": pipe.scheduler.timesteps.tolist()},
        "saturation": {"masked": _saturation(masked), "unmasked": _saturation(unmasked), "base": _saturation(base)},
        "mean_abs_difference_masked_vs_unmasked": float(np.abs(np.stack(masked) - np.stack(unmasked)).mean()),
        "files": {"concept": str(concept), "lora": str(result.output_file), "grid": str(grid_path),
                  "schedule": str(schedule_path), "summary": str(out / "summary.json")},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
