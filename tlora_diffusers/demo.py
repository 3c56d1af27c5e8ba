"""The offline demo: teach the shipped scenes model a shape it has never seen, with a LoRA and a T-LoRA.

Both are trained by :func:`tlora_diffusers.training.train` on one generated image (a striped
novel shape at the top left of a white background) with the prompt "a sks shape", loaded
back into the stock pipeline with ``load_lora_weights``, and sampled on prompts that keep
or change the context. A T-LoRA should keep the concept while following the new background
or position; a LoRA of the same rank tends to copy its training image. The evaluator reads
back what each sample shows (IS: concept similarity, TS: prompt following).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Union

import torch

__all__ = ["run_demo", "DEMO_PROMPTS", "LOOK_FOR"]

DEMO_PROMPTS = (
    "a sks shape",
    "a sks shape on a blue background",
    "a sks shape on a black background",
    "a sks shape at the bottom right",
    "a sks shape in the center",
)
LOOK_FOR = (
    "Every row uses the same seeds; column 1 is the training image. Look at the context columns (a new background or "
    "position). In the measured experiment (README, 'Does it work?'), at the same concept similarity T-LoRAs with "
    "min_rank 1 (this demo's) followed such prompts better than a LoRA on average and kept the training image's white "
    "background and top-left position less often: a small effect, clear only at rank 16 (at this demo's rank 8 its "
    "interval includes zero), so one grid may show it or not. The 'no mask' row is the same T-LoRA file run at full "
    "rank at every step, as a loader without tlora_diffusers runs it: at this rank it is not burnt and differs little "
    "from the masked row. The base row never saw the concept. Two samples per prompt illustrate; they do not measure."
)
METRICS = {
    "IS": "concept similarity to the training image (evaluator features of shape, colour, texture; higher = more "
          "of the concept)",
    "TS": "prompt following: share of context prompts whose new background or position the sample shows",
    "copy_rate": "share of context samples that kept the training image's background or position (memorisation)",
    "concept": "share of samples showing the concept's shape, colour and texture",
}


def _train(model: Path, out: Path, image: Path, rank: int, min_rank: int, steps: int, lr: float, seed: int,
           progress: bool) -> Any:
    from .training import TrainConfig, train

    cfg = TrainConfig(model=str(model), images=[str(image)], prompt="a sks shape", output_dir=str(out),
                      resolution=32, steps=steps, learning_rate=lr, rank=rank, min_rank=min_rank, batch_size=4,
                      seed=seed, overwrite=True, progress=progress)
    return train(cfg)


def run_demo(
    out_dir: Union[str, Path] = "tlora-demo",
    *,
    steps: int = 400,
    rank: int = 8,
    min_rank: int = 1,
    learning_rate: float = 3e-3,
    seed: int = 0,
    samples: int = 2,
    progress: bool = True,
    weights: Union[str, Path, None] = None,
) -> dict[str, Any]:
    """Run the whole demo; returns (and writes as ``summary.json``) what it did, measured and wrote.

    ``weights``: a scenes weights folder (``pipeline/`` and ``evaluator.safetensors``); default: the shipped one.
    """
    from PIL import Image

    from . import TLoRAPatch
    from .plot import labelled_grid
    from .scenes import WEIGHTS, load_evaluator, load_pipeline, render
    from .scenes.evaluate import GUIDANCE, STEPS, concept_scene, customization_metrics, customization_prompts, generate

    t0 = time.perf_counter()
    weights = Path(weights) if weights is not None else WEIGHTS
    model = weights / "pipeline"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    concept = concept_scene(seed)
    image_path = out / "training-image.png"
    training_image = Image.fromarray(render(concept))
    training_image.save(image_path)
    trained = {}
    if not 0 <= min_rank < rank:
        raise ValueError(f"min_rank must be in [0, rank - 1] = [0, {rank - 1}] (min_rank = rank is the LoRA), "
                         f"got {min_rank}")
    for name, ranks_on in (("lora", rank), ("tlora", min_rank)):
        t_train = time.perf_counter()
        result = _train(model, out / name, image_path, rank, ranks_on, steps, learning_rate, seed, progress)
        trained[name] = {"file": str(result.output_file), "min_rank": ranks_on,
                         "seconds": round(time.perf_counter() - t_train, 1)}

    pipe, evaluator = load_pipeline(model), load_evaluator(weights)
    items = customization_prompts(concept, samples)
    metric_prompts = [it["prompt"] for it in items]
    rows, metrics = {}, {}

    def sample(label: str, lora: Any, masked: bool) -> None:
        if lora is not None:
            pipe.load_lora_weights(lora, adapter_name="demo")  # stock diffusers
        try:
            def draw(prompts: Any, base_seed: int) -> torch.Tensor:
                if masked:
                    with TLoRAPatch(pipe):  # the schedule comes from the file
                        return generate(pipe, prompts, base_seed)
                return generate(pipe, prompts, base_seed)

            rows[label] = draw(list(DEMO_PROMPTS), 1000 + seed)
            metrics[label] = customization_metrics(evaluator, draw(metric_prompts, 2000 + seed), items, concept)
        finally:
            if lora is not None:
                pipe.delete_adapters("demo")

    t_sample = time.perf_counter()
    sample("LoRA", trained["lora"]["file"], masked=False)
    sample("T-LoRA, masked", trained["tlora"]["file"], masked=True)
    sample("T-LoRA, no mask", trained["tlora"]["file"], masked=False)
    sample("base model", None, masked=False)
    sample_seconds = time.perf_counter() - t_sample

    to_pil = pipe.image_processor.numpy_to_pil
    grid_rows = [[training_image] + to_pil(images.permute(0, 2, 3, 1).numpy()) for images in rows.values()]
    row_labels = [f"{label}\nIS {metrics[label]['IS']:.2f} TS {metrics[label]['TS']:.2f}" for label in rows]
    grid = labelled_grid(grid_rows, row_labels=row_labels, col_labels=["training image", *DEMO_PROMPTS],
                         min_cell=128, title=f"concept: {concept.colour} striped {concept.shape} (never seen by the "
                                             f"base), rank {rank}, T-LoRA min_rank {min_rank}, {steps} steps")
    grid_path = out / "grid.png"
    grid.save(grid_path)
    files = {"training_image": str(image_path), "grid": str(grid_path), "lora": trained["lora"]["file"],
             "tlora": trained["tlora"]["file"], "pipeline": str(model), "summary": str(out / "summary.json")}
    commands = {
        "generate": (f"tlora-diffusers generate --model {model} --lora {trained['tlora']['file']} --prompt "
                     f"\"a sks shape on a blue background\" --steps {STEPS} --guidance {GUIDANCE} --width 32 "
                     "--height 32 --num-images 4 --no-mask --grid"),
        "inspect": f"tlora-diffusers inspect {trained['tlora']['file']}",
    }
    summary = {
        "output_dir": str(out), "concept": concept.__dict__, "rank": rank, "min_rank": min_rank, "steps": steps,
        "learning_rate": learning_rate,
        "seed": seed, "prompts": list(DEMO_PROMPTS), "look_for": LOOK_FOR, "metric_meanings": METRICS,
        "metrics": metrics, "trained": trained, "files": files, "commands": commands,
        "sampling": {"steps": STEPS, "guidance": GUIDANCE, "seconds": round(sample_seconds, 1),
                     "metric_samples_per_row": len(items)},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")
    return summary
