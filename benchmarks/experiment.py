"""The paper's experiment in miniature: one-image customisation of an unseen concept on the scenes model.

    python benchmarks/experiment.py --out benchmarks/results --workers 2  # the committed run (40 min on 2 cores)
    python benchmarks/experiment.py --quick                               # 1 seed, rank 8, ~2 min

For each seed: a concept (a shape the base never saw, striped, large, top left, white
background), one rendered training image, the prompt "a sks shape". Every method trains
through ``tlora_diffusers.training.train`` with the same seed, so the same noise and
timesteps: ``lora`` (min_rank = max_rank: an ordinary LoRA), ``tlora`` (vanilla T-LoRA) and
``tlora_ortho`` (the paper's orthogonal variant), at ranks 4, 8 and 16. Runs are extended
checkpoint by checkpoint (``resume`` with more steps, bit-identical to one long run); each
checkpoint's LoRA is loaded into the stock pipeline and sampled on the training prompt and
on prompts that change the background or the position. T-LoRAs are also sampled without
their mask. Metrics (see :func:`tlora_diffusers.scenes.evaluate.customization_metrics`): IS,
TS, copy rate, distance, diversity. Comparisons are at matched IS along the checkpoint
curve, paired by seed, with bootstrap 95 % confidence intervals.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METHODS = ("lora", "tlora", "tlora_ortho")
LABELS = {"lora": "LoRA", "tlora": "Vanilla T-LoRA", "tlora_ortho": "T-LoRA (ortho)"}


def _config(method: str, rank: int, seed: int, image: Path, out: Path, steps: int, lr: float, model: Path) -> Any:
    from tlora_diffusers.training import TrainConfig

    min_rank = rank if method == "lora" else max(1, rank // 2)
    return TrainConfig(
        model=str(model), images=[str(image)], prompt="a sks shape", output_dir=str(out), resolution=32,
        steps=steps, learning_rate=lr, rank=rank, min_rank=min_rank, alpha=1.0,
        variant="ortho" if method == "tlora_ortho" else "vanilla", batch_size=4, seed=seed, progress=False,
        resume=out.exists(), keep_checkpoints=1,
    )


def _sample(pipe: Any, lora: Path, items: list[dict], seed: int, masked: bool) -> Any:
    from tlora_diffusers import TLoRAPatch
    from tlora_diffusers.scenes.evaluate import generate

    pipe.load_lora_weights(str(lora), adapter_name="exp")
    try:
        prompts = [it["prompt"] for it in items]
        if masked:
            with TLoRAPatch(pipe):
                return generate(pipe, prompts, seed)
        return generate(pipe, prompts, seed)
    finally:
        pipe.delete_adapters("exp")


def run_one(method: str, rank: int, seed: int, checkpoints: list[int], lr: float, work: Path, pipe: Any,
            evaluator: Any, samples: int, model: Path) -> dict:
    """Train one method/rank/seed checkpoint by checkpoint; evaluate each checkpoint (and the last unmasked)."""
    from tlora_diffusers.scenes import render
    from tlora_diffusers.scenes.evaluate import concept_scene, customization_metrics, customization_prompts, saturation
    from tlora_diffusers.training import train

    concept = concept_scene(seed)
    image = work / f"concept-{seed}.png"
    if not image.exists():  # workers may race here: each writes its own file, then renames it into place
        import os

        from PIL import Image

        part = image.with_name(f"{image.stem}.{os.getpid()}.png")
        Image.fromarray(render(concept)).save(part)
        os.replace(part, image)
    out = work / f"{method}-r{rank}-s{seed}"
    items = customization_prompts(concept, samples)
    curve = []
    for steps in checkpoints:
        result = train(_config(method, rank, seed, image, out, steps, lr, model))
        images = _sample(pipe, result.output_file, items, 10_000 + seed, masked=method != "lora")
        metrics = customization_metrics(evaluator, images, items, concept)
        metrics.update(step=steps, saturation=saturation(images))
        curve.append(metrics)
    row: dict[str, Any] = {"method": method, "rank": rank, "seed": seed, "concept": concept.__dict__, "curve": curve}
    if method != "lora":  # the same T-LoRA run without its mask: every rank at every step
        images = _sample(pipe, result.output_file, items, 10_000 + seed, masked=False)
        row["unmasked"] = dict(customization_metrics(evaluator, images, items, concept), saturation=saturation(images))
    shutil.rmtree(out, ignore_errors=True)
    return row


def _interp(curve: list[dict], x: float, key: str) -> float:
    """``key`` at IS = ``x`` by linear interpolation over the checkpoints sorted by IS (clamped at the ends)."""
    pts = sorted((c["IS"], c[key]) for c in curve)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return pts[-1][1]


def matched(rows: list[dict], method: str, rank: int, key: str = "TS") -> list[dict]:
    """Per seed: ``key`` of ``method`` and of LoRA at the same IS (the middle of the IS range both reach)."""
    out = []
    for seed in sorted({r["seed"] for r in rows}):
        a = next((r for r in rows if (r["method"], r["rank"], r["seed"]) == (method, rank, seed)), None)
        b = next((r for r in rows if (r["method"], r["rank"], r["seed"]) == ("lora", rank, seed)), None)
        if a is None or b is None:
            continue
        lo = max(min(c["IS"] for c in a["curve"]), min(c["IS"] for c in b["curve"]))
        hi = min(max(c["IS"] for c in a["curve"]), max(c["IS"] for c in b["curve"]))
        x = (lo + hi) / 2 if lo <= hi else (max(c["IS"] for c in a["curve"]) + max(c["IS"] for c in b["curve"])) / 2
        out.append({"seed": seed, "IS": x, "method": _interp(a["curve"], x, key), "lora": _interp(b["curve"], x, key),
                    "overlap": lo <= hi})
    return out


def bootstrap_ci(values: list[float], n: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap 95 % interval of the mean."""
    if not values:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(n))
    return sum(values) / len(values), means[int(0.025 * n)], means[int(0.975 * n) - 1]


def summarize(rows: list[dict]) -> dict:
    """The paper-shaped table (final checkpoint IS/TS) and the matched-IS paired differences."""
    table, paired = {}, {}
    for method in METHODS:
        for rank in sorted({r["rank"] for r in rows}):
            mine = [r for r in rows if (r["method"], r["rank"]) == (method, rank)]
            if not mine:
                continue
            last = [r["curve"][-1] for r in mine]
            table[f"{method}/r{rank}"] = {k: sum(c[k] for c in last) / len(last)
                                          for k in ("IS", "TS", "copy_rate", "distance", "diversity", "concept")}
            if method != "lora":
                un = [r["unmasked"] for r in mine if "unmasked" in r]
                if un:
                    table[f"{method}/r{rank}"]["unmasked"] = {k: sum(u[k] for u in un) / len(un)
                                                              for k in ("IS", "TS", "copy_rate", "saturation")}
                for key in ("TS", "copy_rate", "diversity"):
                    m = matched(rows, method, rank, key)
                    diffs = [p["method"] - p["lora"] for p in m]
                    mean, lo, hi = bootstrap_ci(diffs)
                    paired[f"{method}/r{rank}/{key}"] = {"mean_diff": mean, "ci95": [lo, hi], "seeds": len(diffs),
                                                         "IS": [p["IS"] for p in m],
                                                         "overlap": all(p["overlap"] for p in m),
                                                         "matched_seeds": sum(p["overlap"] for p in m)}
    return {"table": table, "matched_vs_lora": paired}


def render_markdown(result: dict) -> str:
    s = result["summary"]
    ranks = sorted({int(k.split("/r")[1]) for k in s["table"]})
    lines = [f"# T-LoRA vs LoRA on the scenes model ({result['seeds']} seeds)", "",
             f"Command: `{result['command']}`", "",
             "Final checkpoint, mean over seeds (IS: concept similarity; TS: changed-attribute accuracy):", "",
             "| method | " + " | ".join(f"r{r} IS / TS" for r in ranks) + " |",
             "|---|" + "---:|" * len(ranks)]
    for method in METHODS:
        cells = []
        for r in ranks:
            c = s["table"].get(f"{method}/r{r}")
            cells.append(f"{c['IS']:.3f} / {c['TS']:.3f}" if c else "–")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += ["", "At matched IS (interpolated along each run's checkpoints), T-LoRA minus LoRA, mean over seeds "
              "[bootstrap 95 % CI]; (k/n): seeds whose two IS ranges overlap, the others are compared at the nearest "
              "checkpoints (the end of the lower curve's range), so there T-LoRA is also at a lower IS:", "", "| | " + " | ".join(f"r{r}" for r in ranks) + " |",
              "|---|" + "---:|" * len(ranks)]
    for method in METHODS[1:]:
        for key in ("TS", "copy_rate", "diversity"):
            cells = []
            for r in ranks:
                p = s["matched_vs_lora"].get(f"{method}/r{r}/{key}")
                matched = (f" ({p['matched_seeds']}/{p['seeds']})" if p and "matched_seeds" in p and key == "TS" else "")
                cells.append(f"{p['mean_diff']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]{matched}" if p else "–")
            lines.append(f"| {LABELS[method]} Δ{key} | " + " | ".join(cells) + " |")
    lines += ["", "Without the mask (the same T-LoRA files, every rank at every step), final checkpoint:", "",
              "| | " + " | ".join(f"r{r} IS / TS / saturation" for r in ranks) + " |", "|---|" + "---:|" * len(ranks)]
    for method in METHODS[1:]:
        cells = []
        for r in ranks:
            c = s["table"].get(f"{method}/r{r}")
            u = c.get("unmasked") if c else None
            cells.append(f"{u['IS']:.3f} / {u['TS']:.3f} / {u['saturation']:.3f}" if u else "–")
        lines.append(f"| {LABELS[method]}, unmasked | " + " | ".join(cells) + " |")
    lines.append(f"\nSeconds: {result['seconds']:.0f}.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({r["rank"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(ranks), figsize=(4.2 * len(ranks), 3.6), squeeze=False)
    colours = {"lora": "tab:red", "tlora": "tab:blue", "tlora_ortho": "tab:green"}
    for ax, rank in zip(axes[0], ranks):
        for method in METHODS:
            for i, row in enumerate(r for r in result["rows"] if (r["method"], r["rank"]) == (method, rank)):
                xs, ys = [c["IS"] for c in row["curve"]], [c["TS"] for c in row["curve"]]
                ax.plot(xs, ys, "-o", ms=3, color=colours[method], alpha=0.6, label=LABELS[method] if i == 0 else None)
        ax.set_title(f"rank {rank}")
        ax.set_xlabel("IS (concept similarity)")
        ax.set_ylabel("TS (prompt following)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Along training (checkpoints), each seed a line: up and right is better")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


_WORKER: dict = {}


def _worker_init(weights: Path, threads: int, checkpoints: list[int], lr: float, work: str, samples: int) -> None:
    """Load the pipeline and evaluator once per process."""
    import torch

    torch.set_num_threads(threads)
    from tlora_diffusers.cli._common import quiet_libraries
    from tlora_diffusers.scenes import load_evaluator, load_pipeline

    with quiet_libraries(False):
        _WORKER.update(pipe=load_pipeline(weights / "pipeline"), evaluator=load_evaluator(weights), weights=weights,
                       checkpoints=checkpoints, lr=lr, work=Path(work), samples=samples)


def _worker_run(job: tuple[str, int, int]) -> dict:
    from tlora_diffusers.cli._common import quiet_libraries

    method, rank, seed = job
    w = _WORKER
    t0 = time.perf_counter()
    with quiet_libraries(False):
        row = run_one(method, rank, seed, w["checkpoints"], w["lr"], w["work"], w["pipe"], w["evaluator"],
                      w["samples"], w["weights"] / "pipeline")
    last = row["curve"][-1]
    row["seconds"] = time.perf_counter() - t0
    print(f"[experiment] seed {seed} rank {rank} {method}: IS {last['IS']:.3f} TS {last['TS']:.3f} "
          f"copy {last['copy_rate']:.2f} ({row['seconds']:.0f} s)", flush=True)
    return row


def rerender(path: Path) -> dict:
    """Recompute the summary, markdown and plot of a committed result from its rows (no training)."""
    result = json.loads(path.read_text())
    result["summary"] = summarize(result["rows"])
    path.write_text(json.dumps(result, indent=2))
    path.with_suffix(".md").write_text(render_markdown(result))
    plot(result, path.with_suffix(".png"))
    return result


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, rank 8, 2 checkpoints (<= 10 min)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--ranks", default="4,8,16")
    p.add_argument("--checkpoints", default="100,200,300,400", help="training steps at which to evaluate")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (constant)")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--threads", type=int, default=2, help="torch threads in all (split between workers)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes training runs in parallel, each with threads/workers torch threads")
    p.add_argument("--out", default=str(REPO / "bench-out"))
    p.add_argument("--weights", default=None, help="a scenes weights folder (default: the shipped one)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from tlora_diffusers.scenes import WEIGHTS

    seeds = [0] if args.quick else list(range(args.seeds))
    ranks = [8] if args.quick else [int(r) for r in args.ranks.split(",")]
    checkpoints = [100, 200] if args.quick else [int(s) for s in args.checkpoints.split(",")]
    out = Path(args.out)
    work = out / "experiment-work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    weights = Path(args.weights) if args.weights else WEIGHTS
    jobs = [(method, rank, seed) for seed in seeds for rank in ranks for method in METHODS]
    setup = (weights, max(1, args.threads // max(1, args.workers)), checkpoints, args.lr, str(work), args.samples)
    if args.workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=setup) as pool:
            rows = list(pool.map(_worker_run, jobs))
    else:
        _worker_init(*setup)
        rows = [_worker_run(job) for job in jobs]
    name = "tlora_effect-quick" if args.quick else "tlora_effect"
    result = {"name": name, "command": "python benchmarks/experiment.py " + " ".join(argv or sys.argv[1:]),
              "seeds": len(seeds), "ranks": ranks, "checkpoints": checkpoints, "lr": args.lr, "rows": rows,
              "seconds": time.perf_counter() - started}
    result["summary"] = summarize(rows)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(render_markdown(result))
    plot(result, out / f"{name}.png")
    shutil.rmtree(work, ignore_errors=True)
    print(render_markdown(result))
    return result


if __name__ == "__main__":
    main()
