"""The paper's experiment in miniature: one-image customisation of an unseen concept on the scenes model.

    python benchmarks/experiment.py --out benchmarks/results --workers 2 \\
        --sweep-ortho-lrs 2e-3,4e-3,8e-3               # phase 1: LoRA + vanilla grid, ortho lr sweep
    python benchmarks/experiment.py --out benchmarks/results --workers 2 --ortho-lr X   # phase 2: ortho grid
    python benchmarks/experiment.py --quick                                              # 1 seed, rank 8, minutes

For each seed: a concept (a shape the base never saw, striped, large, top left, white
background), one rendered training image, the prompt "a sks shape". Every configuration
trains through ``tlora_diffusers.training.train`` with the same seed, so the same noise and
timesteps:

* ``lora``: min_rank = max_rank, an ordinary LoRA (the control);
* ``tlora_min1`` / ``tlora_half``: vanilla T-LoRA with min_rank 1 (every default a user
  meets) and rank // 2 (the paper's SDXL recipe);
* ``ortho_min1`` / ``ortho_half``: the paper's orthogonal variant, at its own learning rate
  (``--ortho-lr``, chosen by the ``--sweep-ortho-lrs`` sweep so its IS curve meets LoRA's).

Runs are extended checkpoint by checkpoint (``resume`` with more steps, bit-identical to one
long run); each checkpoint's LoRA is loaded into the stock pipeline and sampled on the
training prompt and on prompts that change the background or the position. Every T-LoRA
checkpoint is sampled twice, with its mask and without it (every rank at every step), with
the same seeds. Metrics (:func:`tlora_diffusers.scenes.evaluate.customization_metrics`): IS,
TS, copy rate, distance, diversity, saturation. Comparisons are paired by seed, with
bootstrap 95 % confidence intervals over seeds.

Each finished run is appended to ``<out>/experiment-work/rows.jsonl``: a command that stops
(or another phase) resumes from it, and the result files are written from every row there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: name: (trainer variant, min_rank as a function of the rank, label).
CONFIGS: dict[str, tuple[str, str, str]] = {
    "lora": ("vanilla", "rank", "LoRA"),
    "tlora_min1": ("vanilla", "1", "T-LoRA, min_rank 1"),
    "tlora_half": ("vanilla", "rank/2", "T-LoRA, min_rank r/2"),
    "ortho_min1": ("ortho", "1", "Ortho T-LoRA, min_rank 1"),
    "ortho_half": ("ortho", "rank/2", "Ortho T-LoRA, min_rank r/2"),
}
TLORA_CONFIGS = tuple(c for c in CONFIGS if c != "lora")
ORTHO_CONFIGS = tuple(c for c in CONFIGS if CONFIGS[c][0] == "ortho")
LABELS = {name: spec[2] for name, spec in CONFIGS.items()}
METRICS = ("IS", "TS", "copy_rate", "saturation")
CHECKPOINTS = (200, 400, 800, 1200, 1600)
SWEEP_CHECKPOINTS = (200, 400, 800)
PLANNED_SEEDS = 5  # the default of --seeds: the grid the results are measured against


def coverage(rows: list[dict], planned: int = PLANNED_SEEDS) -> dict[str, dict[str, list[int]]]:
    """Per ``config/rank`` of the grid: the seeds that ran and those of ``range(planned)`` that did not."""
    cells: dict[str, set] = {}
    for r in rows:
        if not r.get("sweep"):
            cells.setdefault(f"{r['config']}/r{r['rank']}", set()).add(r["seed"])
    order = {c: i for i, c in enumerate(CONFIGS)}
    keys = sorted(cells, key=lambda k: (order.get(k.split("/")[0], len(order)), int(k.split("/r")[1])))
    return {k: {"ran": sorted(cells[k]), "missing": [s for s in range(planned) if s not in cells[k]]} for k in keys}


def min_rank_of(config: str, rank: int) -> int:
    rule = CONFIGS[config][1]
    return rank if rule == "rank" else 1 if rule == "1" else max(1, rank // 2)


def _config(config: str, rank: int, seed: int, image: Path, out: Path, steps: int, lr: float, model: Path) -> Any:
    from tlora_diffusers.training import TrainConfig

    return TrainConfig(
        model=str(model), images=[str(image)], prompt="a sks shape", output_dir=str(out), resolution=32,
        steps=steps, learning_rate=lr, rank=rank, min_rank=min_rank_of(config, rank), alpha=1.0,
        variant=CONFIGS[config][0], batch_size=4, seed=seed, progress=False, resume=out.exists(), keep_checkpoints=1,
    )


def _sample(pipe: Any, lora: Path, items: list[dict], seed: int, masks: Iterable[bool]) -> dict[bool, Any]:
    """Images for ``items`` with the LoRA file loaded, for each of ``masks`` (True: under ``TLoRAPatch``)."""
    from tlora_diffusers import TLoRAPatch
    from tlora_diffusers.scenes.evaluate import generate

    pipe.load_lora_weights(str(lora), adapter_name="exp")
    try:
        prompts = [it["prompt"] for it in items]
        out = {}
        for masked in masks:
            if masked:
                with TLoRAPatch(pipe):
                    out[masked] = generate(pipe, prompts, seed)
            else:
                out[masked] = generate(pipe, prompts, seed)
        return out
    finally:
        pipe.delete_adapters("exp")


def _trained_steps(out: Path) -> int:
    """Steps the run folder ``out`` holds a checkpoint of (0: none)."""
    steps = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps, default=0)


def run_one(config: str, rank: int, seed: int, checkpoints: list[int], lr: float, work: Path, pipe: Any,
            evaluator: Any, samples: int, model: Path) -> dict:
    """Train one configuration/rank/seed checkpoint by checkpoint; evaluate each checkpoint (T-LoRAs also unmasked)."""
    from tlora_diffusers.scenes import render
    from tlora_diffusers.scenes.evaluate import concept_scene, customization_metrics, customization_prompts, saturation
    from tlora_diffusers.training import train

    concept = concept_scene(seed)
    image = work / f"concept-{seed}.png"
    if not image.exists():  # workers may race here: each writes its own file, then renames it into place
        from PIL import Image

        part = image.with_name(f"{image.stem}.{os.getpid()}.png")
        Image.fromarray(render(concept)).save(part)
        os.replace(part, image)
    out = work / f"{config}-r{rank}-s{seed}-lr{lr:g}"
    items = customization_prompts(concept, samples)
    masks = (True,) if config == "lora" else (True, False)
    # Each checkpoint's point is kept in the run folder as soon as it is measured, so a run that was stopped
    # continues where it was (training resumes bit-identically). A folder trained past a checkpoint whose point
    # was not kept cannot give that point any more: it starts over.
    points_path = out / "experiment-points.jsonl"
    kept = {}
    if points_path.exists():
        kept = {p["step"]: p for p in map(json.loads, points_path.read_text().splitlines()) if p.get("step")}
    trained = _trained_steps(out)
    if trained and any(step < trained and step not in kept for step in checkpoints):
        shutil.rmtree(out)
        kept = {}
    curve = []
    for steps in checkpoints:
        if steps in kept:
            curve.append(kept[steps])
            continue
        result = train(_config(config, rank, seed, image, out, steps, lr, model))
        print(f"[experiment]   {config} r{rank} s{seed}: {steps} steps trained, sampling", flush=True)
        images = _sample(pipe, result.output_file, items, 10_000 + seed, masks)
        point: dict[str, Any] = {"step": steps}
        for masked, imgs in images.items():
            metrics = dict(customization_metrics(evaluator, imgs, items, concept), saturation=saturation(imgs))
            if masked:
                point.update(metrics)
            else:
                point["unmasked"] = metrics
        curve.append(point)
        with open(points_path, "a") as f:
            f.write(json.dumps(point) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    return {"config": config, "variant": CONFIGS[config][0], "min_rank": min_rank_of(config, rank), "rank": rank,
            "seed": seed, "lr": lr, "samples": samples, "concept": concept.__dict__, "curve": curve}


# -- statistics ---------------------------------------------------------------------------------------

def bootstrap_ci(values: list[float], n: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap 95 % interval of the mean."""
    if not values:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(n))
    return sum(values) / len(values), means[int(0.025 * n)], means[int(0.975 * n) - 1]


def _stat(values: list[float]) -> dict:
    mean, lo, hi = bootstrap_ci(values)
    return {"mean": mean, "ci95": [lo, hi], "n": len(values)}


def _interp(curve: list[dict], x: float, key: str) -> float:
    """``key`` at IS = ``x`` by linear interpolation over the checkpoints sorted by IS (clamped at the ends)."""
    pts = sorted((c["IS"], c[key]) for c in curve)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return pts[-1][1]


def _unmasked_curve(row: dict) -> list[dict]:
    return [dict(c["unmasked"], step=c["step"]) for c in row["curve"]]


def matched_pair(a: list[dict], b: list[dict], key: str) -> dict:
    """``key`` of curves ``a`` and ``b`` at the same IS: the middle of the IS range both reach.

    Where the ranges do not overlap (``overlap`` False) both are read at the middle of their
    maxima, i.e. the lower curve at its end.
    """
    lo = max(min(c["IS"] for c in a), min(c["IS"] for c in b))
    hi = min(max(c["IS"] for c in a), max(c["IS"] for c in b))
    x = (lo + hi) / 2 if lo <= hi else (max(c["IS"] for c in a) + max(c["IS"] for c in b)) / 2
    return {"IS": x, "a": _interp(a, x, key), "b": _interp(b, x, key), "overlap": lo <= hi}


def _rows(rows: list[dict], config: str, rank: int, sweep: bool = False, lr: Optional[float] = None) -> dict[int, dict]:
    return {r["seed"]: r for r in rows if (r["config"], r["rank"]) == (config, rank)
            and bool(r.get("sweep")) == sweep and (lr is None or r["lr"] == lr)}


def _truncate(curve: list[dict], last_step: int) -> list[dict]:
    return [c for c in curve if c["step"] <= last_step]


def _matched_stats(pairs: list[dict]) -> dict:
    out = _stat([p["a"] - p["b"] for p in pairs])
    out.update(matched_seeds=sum(p["overlap"] for p in pairs), IS=[p["IS"] for p in pairs])
    return out


def summarize(rows: list[dict]) -> dict:
    """Every table of the report, from the rows alone (see :func:`render_markdown`)."""
    grid = [r for r in rows if not r.get("sweep")]
    ranks = sorted({r["rank"] for r in grid})
    table: dict[str, Any] = {}
    matched: dict[str, Any] = {}
    mask_ab: dict[str, Any] = {}
    along: dict[str, Any] = {}
    for config in CONFIGS:
        for rank in ranks:
            mine = _rows(grid, config, rank)
            if not mine:
                continue
            key = f"{config}/r{rank}"
            steps = [c["step"] for c in next(iter(mine.values()))["curve"]]
            last = [r["curve"][-1] for r in mine.values()]
            table[key] = {k: sum(c[k] for c in last) / len(last) for k in METRICS}
            table[key]["seeds"] = len(mine)
            table[key]["lr"] = next(iter(mine.values()))["lr"]
            # Along training: mean and CI of each metric at each checkpoint (masked, and unmasked for T-LoRAs).
            along[key] = {"steps": steps}
            for k in METRICS:
                along[key][k] = [_stat([r["curve"][i][k] for r in mine.values()]) for i in range(len(steps))]
                if config != "lora":
                    along[key][f"unmasked_{k}"] = [_stat([r["curve"][i]["unmasked"][k] for r in mine.values()])
                                                   for i in range(len(steps))]
            # Overfitting: the change from the first to the last checkpoint, paired by seed.
            along[key]["first_to_last"] = {k: _stat([r["curve"][-1][k] - r["curve"][0][k] for r in mine.values()])
                                           for k in METRICS}
            if config == "lora":
                continue
            table[key]["unmasked"] = {k: sum(c["unmasked"][k] for c in last) / len(last) for k in METRICS}
            # The mask A/B: masked - unmasked, per seed averaged over checkpoints, and at each checkpoint.
            mask_ab[key] = {k: _stat([sum(c[k] - c["unmasked"][k] for c in r["curve"]) / len(r["curve"])
                                      for r in mine.values()]) for k in METRICS}
            mask_ab[key]["per_step"] = {k: [_stat([r["curve"][i][k] - r["curve"][i]["unmasked"][k]
                                                   for r in mine.values()]) for i in range(len(steps))]
                                        for k in METRICS}
            mask_ab[key]["pairs_IS_lower_unmasked"] = [
                sum(c["unmasked"]["IS"] < c["IS"] for r in mine.values() for c in r["curve"]),
                sum(len(r["curve"]) for r in mine.values())]
            # Matched IS against LoRA (same seed), masked and unmasked.
            lora = _rows(grid, "lora", rank)
            seeds = sorted(set(mine) & set(lora))
            for k in ("TS", "copy_rate"):
                matched[f"{key}/{k}"] = _matched_stats([matched_pair(mine[s]["curve"], lora[s]["curve"], k) for s in seeds])
                matched[f"{key}/unmasked/{k}"] = _matched_stats(
                    [matched_pair(_unmasked_curve(mine[s]), lora[s]["curve"], k) for s in seeds])
    return {"table": table, "matched_vs_lora": matched, "mask_ab": mask_ab, "along": along, "sweep": sweep_summary(rows)}


def sweep_summary(rows: list[dict]) -> dict:
    """The ortho learning-rate sweep: per configuration/rank/lr, in how many seeds its IS range meets LoRA's."""
    out: dict[str, Any] = {}
    for r in rows:
        if not r.get("sweep"):
            continue
        key = f"{r['config']}/r{r['rank']}/lr{r['lr']:g}"
        if key in out:
            continue
        mine = _rows(rows, r["config"], r["rank"], sweep=True, lr=r["lr"])
        lora = _rows(rows, "lora", r["rank"])
        last_step = max(c["step"] for c in r["curve"])
        seeds = sorted(set(mine) & set(lora))
        pairs = [matched_pair(mine[s]["curve"], _truncate(lora[s]["curve"], last_step), "TS") for s in seeds]
        out[key] = dict(_matched_stats(pairs), steps=last_step, max_IS=_stat([max(c["IS"] for c in mine[s]["curve"])
                                                                             for s in seeds]),
                        lora_max_IS=_stat([max(c["IS"] for c in _truncate(lora[s]["curve"], last_step)) for s in seeds]))
    return out


# -- report ---------------------------------------------------------------------------------------------

#: Fewer seeds than this get no interval: a bootstrap over one or two values is not one.
MIN_CI_SEEDS = 3


def _ci(s: Optional[dict], signed: bool = True) -> str:
    if not s or s["mean"] != s["mean"]:
        return "–"
    f = "{:+.3f}" if signed else "{:.3f}"
    if s.get("n", MIN_CI_SEEDS) < MIN_CI_SEEDS:
        return f"{f.format(s['mean'])} (n = {s['n']})"
    return f"{f.format(s['mean'])} [{f.format(s['ci95'][0])}, {f.format(s['ci95'][1])}]"


def render_markdown(result: dict) -> str:
    s = result["summary"]
    ranks = sorted({int(k.split("/r")[1]) for k in s["table"]})
    configs = [c for c in CONFIGS if any(f"{c}/r{r}" in s["table"] for r in ranks)]
    head = "| | " + " | ".join(f"r{r}" for r in ranks) + " |\n|---|" + "---:|" * len(ranks)
    seeds = sorted({v["seeds"] for v in s["table"].values()})
    lines = [f"# T-LoRA vs LoRA on the scenes model ({'/'.join(map(str, seeds))} seeds)", "",
             "Commands:", ""] + [f"    {c}" for c in result["commands"]] + [
             "", f"Checkpoints at {', '.join(map(str, result['checkpoints']))} steps; {result['samples']} samples per "
             f"prompt ({result['items']} images per checkpoint); learning rates: "
             + ", ".join(f"{LABELS[c]} {s['table'][f'{c}/r{ranks[0]}']['lr']:g}" for c in configs) + ".", "",
             "IS: concept similarity to the training image; TS: accuracy of the attribute a context prompt changes; "
             "copy rate: context samples that kept the training image's value; saturation: mean HSV saturation "
             "(\"burnt\" samples score high). Means over seeds, [bootstrap 95 % CI over seeds].", "",
             "## Final checkpoint", "", "IS / TS, masked (unmasked):", "", head]
    for c in configs:
        cells = []
        for r in ranks:
            t = s["table"].get(f"{c}/r{r}")
            u = t.get("unmasked") if t else None
            cells.append("–" if not t else f"{t['IS']:.3f} / {t['TS']:.3f}"
                         + (f" ({u['IS']:.3f} / {u['TS']:.3f})" if u else ""))
        lines.append(f"| {LABELS[c]} | " + " | ".join(cells) + " |")
    lines += ["", "## T-LoRA − LoRA at matched IS", "",
              "Interpolated along each run's checkpoints, paired by seed; fewer than 3 seeds: the mean and n, no interval; (k/n): seeds whose IS ranges overlap (the "
              "others are read at the end of the lower curve, where the T-LoRA is also at a lower IS).", "", head]
    for c in configs[1:] if configs[:1] == ["lora"] else configs:
        for k, masked in (("TS", True), ("TS", False), ("copy_rate", True)):
            cells = []
            for r in ranks:
                p = s["matched_vs_lora"].get(f"{c}/r{r}/{k}" if masked else f"{c}/r{r}/unmasked/{k}")
                cells.append(f"{_ci(p)} ({p['matched_seeds']}/{p['n']})" if p else "–")
            lines.append(f"| {LABELS[c]}{'' if masked else ', unmasked'} Δ{k} | " + " | ".join(cells) + " |")
    lines += ["", "## The mask at inference: masked − unmasked", "",
              "The same T-LoRA files sampled with the same seeds with and without `TLoRAPatch`; per seed the mean over "
              "checkpoints; (k/n): (seed, checkpoint) pairs in which the unmasked IS is lower.", "", head]
    for c in configs:
        if c == "lora":
            continue
        for k in METRICS:
            cells = []
            for r in ranks:
                ab = s["mask_ab"].get(f"{c}/r{r}")
                extra = f" ({ab['pairs_IS_lower_unmasked'][0]}/{ab['pairs_IS_lower_unmasked'][1]})" if ab and k == "IS" else ""
                cells.append(_ci(ab[k]) + extra if ab else "–")
            lines.append(f"| {LABELS[c]} Δ{k} | " + " | ".join(cells) + " |")
    lines += ["", "## Along training: last − first checkpoint", "",
              f"Paired by seed, {result['checkpoints'][-1]} − {result['checkpoints'][0]} steps (masked).", "", head]
    for c in configs:
        for k in ("IS", "TS", "copy_rate"):
            cells = [_ci(s["along"].get(f"{c}/r{r}", {}).get("first_to_last", {}).get(k)) for r in ranks]
            lines.append(f"| {LABELS[c]} Δ{k} | " + " | ".join(cells) + " |")
    if s.get("sweep"):
        lines += ["", "## Ortho learning-rate sweep", "",
                  "Per configuration, rank and learning rate: ΔTS against LoRA at matched IS (up to the sweep's last "
                  "checkpoint), seeds whose IS range meets LoRA's, highest IS reached (LoRA's in the same steps).", "",
                  "| run | ΔTS at matched IS | matched seeds | max IS | LoRA max IS |", "|---|---:|---:|---:|---:|"]
        for key, v in sorted(s["sweep"].items(), key=lambda kv: (kv[0].split("/lr")[0], float(kv[0].split("/lr")[1]))):
            lines.append(f"| {key} ({v['steps']} steps) | {_ci(v)} | {v['matched_seeds']}/{v['n']} | "
                         f"{_ci(v['max_IS'], False)} | {_ci(v['lora_max_IS'], False)} |")
    lines += ["", "## Seeds per cell", "",
              f"Planned: seeds 0–{PLANNED_SEEDS - 1} for every configuration and rank; the cells below list what ran "
              "(the rest did not fit in the time the run had).", "", "| cell | seeds run | missing |", "|---|---|---|"]
    for key, v in coverage(result["rows"]).items():
        c, r = key.split("/")
        lines.append(f"| {LABELS[c]}, {r} | {', '.join(map(str, v['ran']))} | {', '.join(map(str, v['missing'])) or '–'} |")
    lines.append(f"\nCPU seconds of training and sampling, summed over runs: {result['seconds']:.0f}.")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Per configuration and rank: TS against IS along training, mean over seeds with 95 % CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    along = result["summary"]["along"]
    ranks = sorted({int(k.split("/r")[1]) for k in along})
    configs = [c for c in TLORA_CONFIGS if any(f"{c}/r{r}" in along for r in ranks)]
    fig, axes = plt.subplots(len(configs), len(ranks), figsize=(3.6 * len(ranks), 3.0 * len(configs)),
                             squeeze=False, sharex=True, sharey=True)

    def series(ax: Any, a: dict, prefix: str, colour: str, style: str, label: str) -> None:
        xs = [p["mean"] for p in a[f"{prefix}IS"]]
        ys = [p["mean"] for p in a[f"{prefix}TS"]]
        lo = [p["ci95"][0] for p in a[f"{prefix}TS"]]
        hi = [p["ci95"][1] for p in a[f"{prefix}TS"]]
        ax.fill(xs + xs[::-1], hi + lo[::-1], color=colour, alpha=0.15, lw=0)
        ax.plot(xs, ys, style, color=colour, ms=3, label=label)
        ax.annotate(str(a["steps"][-1]), (xs[-1], ys[-1]), fontsize=6, color=colour)

    for row, config in zip(axes, configs):
        for ax, rank in zip(row, ranks):
            if f"lora/r{rank}" in along:
                series(ax, along[f"lora/r{rank}"], "", "tab:red", "-o", "LoRA")
            a = along.get(f"{config}/r{rank}")
            if a:
                series(ax, a, "", "tab:blue", "-o", "T-LoRA, masked")
                series(ax, a, "unmasked_", "tab:gray", "--s", "same file, unmasked")
            ax.set_title(f"{LABELS[config]}, rank {rank}", fontsize=8)
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("IS (concept similarity)")
    for row in axes:
        row[0].set_ylabel("TS (prompt following)")
    axes[0][0].legend(fontsize="x-small")
    fig.suptitle("Along training (points: checkpoints, last one labelled), mean over seeds, 95 % CI of TS shaded:\n"
                 "up and right is better", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- running --------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _worker_init(weights: Path, threads: int, work: str) -> None:
    """Load the pipeline and evaluator once per process."""
    import torch

    torch.set_num_threads(threads)
    from tlora_diffusers.cli._common import quiet_libraries
    from tlora_diffusers.scenes import load_evaluator, load_pipeline

    with quiet_libraries(False):
        _WORKER.update(pipe=load_pipeline(weights / "pipeline"), evaluator=load_evaluator(weights), weights=weights,
                       work=Path(work))


def _job_key(job: dict) -> str:
    return json.dumps({k: job[k] for k in ("config", "rank", "seed", "lr", "checkpoints", "samples", "sweep")},
                      sort_keys=True)


def _worker_run(job: dict) -> dict:
    from tlora_diffusers.cli._common import quiet_libraries

    w = _WORKER
    t0 = time.perf_counter()
    with quiet_libraries(False):
        row = run_one(job["config"], job["rank"], job["seed"], job["checkpoints"], job["lr"], w["work"], w["pipe"],
                      w["evaluator"], job["samples"], w["weights"] / "pipeline")
    row.update(sweep=job["sweep"], seconds=time.perf_counter() - t0, key=_job_key(job))
    last = row["curve"][-1]
    un = f" unmasked IS {last['unmasked']['IS']:.3f} TS {last['unmasked']['TS']:.3f}" if "unmasked" in last else ""
    print(f"[experiment] {'sweep ' if job['sweep'] else ''}{job['config']} r{job['rank']} s{job['seed']} "
          f"lr {job['lr']:g}: IS {last['IS']:.3f} TS {last['TS']:.3f}{un} ({row['seconds']:.0f} s)", flush=True)
    return row


def read_rows(work: Path) -> list[dict]:
    path = work / "rows.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_results(out: Path, name: str, rows: list[dict], commands: list[str], checkpoints: list[int],
                  samples: int, items: int) -> dict:
    """``<name>.json``, ``.md`` and ``.png`` from ``rows`` (atomic: each is written beside, then renamed)."""
    result = {"name": name, "commands": commands, "seeds": len({r["seed"] for r in rows if not r.get("sweep")}),
              "ranks": sorted({r["rank"] for r in rows if not r.get("sweep")}), "checkpoints": checkpoints,
              "samples": samples, "items": items, "rows": rows,
              "seconds": sum(r.get("seconds", 0.0) for r in rows)}
    result["summary"] = summarize(rows)
    for suffix, write in ((".json", lambda p: p.write_text(json.dumps(result, indent=1))),
                          (".md", lambda p: p.write_text(render_markdown(result))),
                          (".png", lambda p: plot(result, p))):
        final = out / f"{name}{suffix}"
        part = final.with_name(f"{final.stem}.tmp{suffix}")
        write(part)
        os.replace(part, final)
    return result


def combine(out: Path, sources: list[Path], command: str) -> dict:
    """Write the results from the rows of several runs' folders (phases run with different ``--out``), no training.

    Rows are deduplicated by their job key; the commands are the runs' own, then ``command``.
    """
    rows, seen, commands = [], set(), []
    for src in sources:
        work = src / "experiment-work"
        for row in read_rows(work):
            if row["key"] not in seen:
                seen.add(row["key"])
                rows.append(row)
        meta = work / "commands.json"
        commands += [c for c in (json.loads(meta.read_text()) if meta.exists() else []) if c not in commands]
    if not rows:
        raise SystemExit(f"--combine: no rows in {', '.join(str(s) for s in sources)}")
    grid = [r for r in rows if not r.get("sweep")]
    checkpoints = sorted({c["step"] for r in grid for c in r["curve"]})
    samples = rows[0]["samples"]
    from tlora_diffusers.scenes.evaluate import concept_scene, customization_prompts

    items = len(customization_prompts(concept_scene(0), samples))
    out.mkdir(parents=True, exist_ok=True)
    return write_results(out, "tlora_effect", rows, commands + [command], checkpoints, samples, items)


# -- the README's section ------------------------------------------------------------------------------

README_BEGIN, README_END = "<!-- begin experiment-tables -->", "<!-- end experiment-tables -->"
_MAIN = ("lora", "tlora_min1", "tlora_half", "ortho_min1", "ortho_half")


def _cell(s: Optional[dict], digits: int = 3, n_follows: bool = False) -> str:
    """Mean [95 % CI], bold when the interval excludes 0; with fewer than MIN_CI_SEEDS values the mean and n
    (``n_follows``: the caller prints n itself)."""
    if not s or s["mean"] != s["mean"]:
        return "–"
    f = f"{{:+.{digits}f}}"
    if s.get("n", MIN_CI_SEEDS) < MIN_CI_SEEDS:
        return (f.format(s["mean"]) + ("" if n_follows else f" (n = {s['n']})")).replace("-", "−")
    text = f"{f.format(s['mean'])} [{f.format(s['ci95'][0])}, {f.format(s['ci95'][1])}]".replace("-", "−")
    excludes_zero = s["ci95"][0] > 0 or s["ci95"][1] < 0
    return f"**{text}**" if excludes_zero else text


def readme_tables(result: dict) -> str:
    """The tables of the README's "Does it work?", from a result (the committed JSON); a test keeps them equal."""
    s = result["summary"]
    ranks = sorted({int(k.split("/r")[1]) for k in s["table"]})
    head = "| | " + " | ".join(f"rank {r}" for r in ranks) + " |\n|---|" + "---:|" * len(ranks)
    configs = [c for c in _MAIN if any(f"{c}/r{r}" in s["table"] for r in ranks)]
    seeds = {c: sorted({s["table"][f"{c}/r{r}"]["seeds"] for r in ranks if f"{c}/r{r}" in s["table"]}) for c in configs}
    last = result["checkpoints"][-1]
    out = [f"Final checkpoint ({last} steps), mean over seeds, IS / TS (the same T-LoRA file unmasked):", "", head]
    for c in configs:
        cells = []
        for r in ranks:
            t = s["table"].get(f"{c}/r{r}")
            u = t.get("unmasked") if t else None
            cells.append("–" if not t else f"{t['IS']:.3f} / {t['TS']:.3f}" + (f" ({u['IS']:.3f} / {u['TS']:.3f})" if u else ""))
        n = "/".join(map(str, seeds[c]))
        out.append(f"| {LABELS[c]} ({n} seeds) | " + " | ".join(cells) + " |")
    missing = [f"{LABELS[k.split('/')[0]]} {k.split('/')[1]}: {', '.join(map(str, v['missing']))}"
               for k, v in coverage(result["rows"]).items() if v["missing"]]
    if missing:
        out += ["", f"Not run (of the planned seeds 0–{PLANNED_SEEDS - 1}; they did not fit in the time the run had): "
                    + "; ".join(missing) + "."]
    out += ["", "**T-LoRA − LoRA at matched IS** (along each run's checkpoints, paired by seed; bold: the 95 % "
                "interval excludes 0, fewer than 3 seeds: the mean and n, no interval; (k/n): seeds whose IS ranges overlap, the others read where the lower curve ends):",
            "", head.replace("| |", "| ΔTS at matched IS |", 1)]
    for c in configs[1:]:
        cells = []
        for r in ranks:
            p = s["matched_vs_lora"].get(f"{c}/r{r}/TS")
            cells.append(f"{_cell(p, n_follows=True)} ({p['matched_seeds']}/{p['n']})" if p else "–")
        out.append(f"| {LABELS[c]} | " + " | ".join(cells) + " |")
    out += ["", "**The mask at inference**: the same files sampled with the same seeds with `TLoRAPatch` and "
                "without it (every rank at every step), masked − unmasked, per seed the mean over checkpoints; "
                "(k/n): (seed, checkpoint) pairs in which the unmasked sample has the lower IS:", "",
            head.replace("| |", "| masked − unmasked |", 1)]
    for c in configs[1:]:
        for k in ("IS", "TS", "saturation"):
            cells = []
            for r in ranks:
                ab = s["mask_ab"].get(f"{c}/r{r}")
                extra = (f" ({ab['pairs_IS_lower_unmasked'][0]}/{ab['pairs_IS_lower_unmasked'][1]})"
                         if ab and k == "IS" else "")
                cells.append(_cell(ab[k]) + extra if ab else "–")
            out.append(f"| {LABELS[c]}, Δ{k} | " + " | ".join(cells) + " |")
    first = result["checkpoints"][0]
    out += ["", f"**Along training** ({last} − {first} steps, masked, paired by seed):", "",
            head.replace("| |", "| last − first |", 1)]
    for c in configs:
        for k in ("IS", "TS"):
            cells = [_cell(s["along"].get(f"{c}/r{r}", {}).get("first_to_last", {}).get(k)) for r in ranks]
            out.append(f"| {LABELS[c]}, Δ{k} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def readme_with_tables(text: str, tables: str) -> str:
    from tlora_diffusers.models.docs import replace_between

    return replace_between(text, README_BEGIN, README_END, tables)


def rerender(path: Path) -> dict:
    """Recompute the summary, markdown and plot of a committed result from its rows (no training)."""
    result = json.loads(path.read_text())
    return write_results(path.parent, result["name"], result["rows"], result["commands"], result["checkpoints"],
                         result["samples"], result["items"])


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, rank 8, checkpoints 50/100, 2 samples (minutes)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--ranks", default="4,8,16")
    p.add_argument("--configs", default=",".join(c for c in CONFIGS if c not in ORTHO_CONFIGS),
                   help=f"which of {', '.join(CONFIGS)} to run (ortho ones need --ortho-lr)")
    p.add_argument("--checkpoints", default=",".join(map(str, CHECKPOINTS)), help="training steps at which to evaluate")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of LoRA and vanilla T-LoRA (constant)")
    p.add_argument("--ortho-lr", type=float, default=None, help="learning rate of the ortho configurations")
    p.add_argument("--sweep-ortho-lrs", default="",
                   help="also run the ortho sweep: these learning rates, rank 8, 2 seeds, checkpoints "
                        + ",".join(map(str, SWEEP_CHECKPOINTS)))
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--workers", type=int, default=1, help="processes running jobs in parallel, one torch thread each")
    p.add_argument("--out", default=str(REPO / "bench-out"))
    p.add_argument("--weights", default=None, help="a scenes weights folder (default: the shipped one)")
    p.add_argument("--combine", default=None, metavar="DIR,DIR,...",
                   help="no training: write the results into --out from the rows of these runs' --out folders")
    p.add_argument("--readme", default=None, metavar="README",
                   help="no training: rewrite this README's experiment tables from <--out>/tlora_effect.json")
    args = p.parse_args(argv)
    command = "python benchmarks/experiment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.combine:
        result = combine(Path(args.out), [Path(d) for d in args.combine.split(",") if d], command)
        print(render_markdown(result))
        return result
    if args.readme:
        result = json.loads((Path(args.out) / "tlora_effect.json").read_text())
        path = Path(args.readme)
        path.write_text(readme_with_tables(path.read_text(), readme_tables(result)))
        return result
    import torch

    torch.set_num_threads(1)
    from tlora_diffusers.scenes import WEIGHTS
    from tlora_diffusers.scenes.evaluate import concept_scene, customization_prompts

    seeds = [0] if args.quick else list(range(args.seeds))
    ranks = [8] if args.quick else [int(r) for r in args.ranks.split(",")]
    checkpoints = [50, 100] if args.quick else [int(s) for s in args.checkpoints.split(",")]
    samples = 2 if args.quick else args.samples
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            p.error(f"--configs: unknown configuration {c!r}; choose from {', '.join(CONFIGS)}")
        if c in ORTHO_CONFIGS and args.ortho_lr is None:
            p.error(f"--configs {c} needs --ortho-lr (find it with --sweep-ortho-lrs)")
    jobs = []
    for lr in [float(x) for x in args.sweep_ortho_lrs.split(",") if x.strip()]:
        for seed in seeds[:2]:
            jobs += [dict(config="lora", rank=8, seed=seed, lr=args.lr, checkpoints=checkpoints, samples=samples,
                          sweep=False)]
            jobs += [dict(config=c, rank=8, seed=seed, lr=lr, checkpoints=list(SWEEP_CHECKPOINTS), samples=samples,
                          sweep=True) for c in ORTHO_CONFIGS]
    jobs += [dict(config=c, rank=rank, seed=seed, lr=args.ortho_lr if c in ORTHO_CONFIGS else args.lr,
                  checkpoints=checkpoints, samples=samples, sweep=False)
             for seed in seeds for rank in ranks for c in configs]
    out = Path(args.out)
    work = out / "experiment-work"
    work.mkdir(parents=True, exist_ok=True)
    name = "tlora_effect-quick" if args.quick else "tlora_effect"
    meta_path = work / "commands.json"
    commands = json.loads(meta_path.read_text()) if meta_path.exists() else []
    if command not in commands:
        commands.append(command)
        meta_path.write_text(json.dumps(commands))
    done = {r["key"] for r in read_rows(work)}
    todo, seen = [], set(done)
    for job in jobs:
        if _job_key(job) not in seen:
            seen.add(_job_key(job))
            todo.append(job)
    print(f"[experiment] {len(todo)} runs to do ({len(jobs) - len(todo)} already in {work / 'rows.jsonl'})", flush=True)
    weights = Path(args.weights) if args.weights else WEIGHTS
    setup = (weights, 1, str(work))

    def record(row: dict) -> None:
        with open(work / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    if args.workers > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=setup) as pool:
            futures = {pool.submit(_worker_run, job): job for job in todo}
            failed = []
            for future in as_completed(futures):  # one failed job must not stop the others' rows being kept
                try:
                    record(future.result())
                except Exception as e:
                    job = futures[future]
                    failed.append(job)
                    print(f"[experiment] FAILED {job['config']} r{job['rank']} s{job['seed']}: "
                          f"{type(e).__name__}: {e}", flush=True)
            if failed:
                raise SystemExit(f"[experiment] {len(failed)} runs failed (above); the others are kept in "
                                 f"{work / 'rows.jsonl'}, and running the same command again retries them")
    elif todo:
        _worker_init(*setup)
        for job in todo:
            record(_worker_run(job))
    items = len(customization_prompts(concept_scene(0), samples))
    result = write_results(out, name, read_rows(work), commands, checkpoints, samples, items)
    print(render_markdown(result))
    return result


if __name__ == "__main__":
    main()
