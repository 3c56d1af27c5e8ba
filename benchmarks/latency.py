"""Per denoiser call: every variant in one interleaved run, and how the mask path scales with batch and tokens."""

from __future__ import annotations

import gc
import time
from typing import Any, Callable

import torch

from tlora_diffusers import TLoRAConfig

from .harness import interleaved, paired_ratios, peak_bytes, summarize
from .models import build_denoiser, lora_targets, make_inputs
from .variants import VARIANTS, apply_variant

__all__ = ["bench_latency", "bench_scaling", "sampling_timesteps"]


def sampling_timesteps(n: int = 25) -> list[float]:
    """A 25-step schedule's timesteps, high noise first: every call of a run gets a new mask."""
    return torch.linspace(999, 1, n).tolist()


def _runner(applied: Any, inputs: Any, ts: list[float]) -> Callable[[int], Any]:
    def run(i: int) -> Any:
        t = ts[i % len(ts)]
        args, kwargs = inputs.at(t)
        with torch.no_grad():
            return applied.call(args, kwargs, t)

    return run


def bench_latency(kind: str, size: str, rank: int, warmup: int, reps: int, device: torch.device,
                  dtype: torch.dtype, variants: tuple[str, ...] = VARIANTS, log: Callable[[str], None] = print,
                  memory: bool = True) -> list[dict]:
    """One row per variant: median ms per call, IQR, ``x base`` (median ratio and per-round ratio quartiles)."""
    t0 = time.perf_counter()
    base = build_denoiser(kind, size, 0, device, dtype)
    targets = lora_targets(base)
    cfg = TLoRAConfig(rank, 1, 1.0)
    inputs = make_inputs(kind, size, base, seed=0)
    ts = sampling_timesteps()
    rows = []
    groups = [[v for v in variants if not v.startswith("lycoris")], [v for v in variants if v.startswith("lycoris")]]
    for group in groups:
        if not group:
            continue
        names = (["base"] if "base" not in group else []) + group
        applied = {name: apply_variant(name, base, rank, targets, cfg) for name in names}
        runners = {name: _runner(a, inputs, ts) for name, a in applied.items()}
        times = interleaved(runners, warmup, reps, device)
        for name in group:
            stats = summarize(times[name].primary)
            row = {"model": kind, "size": size, "variant": name, "layers": applied[name].layers, "rank": rank,
                   "median_ms": stats["median"], "iqr_ms": stats["iqr"], "n": stats["n"],
                   "x_base": stats["median"] / summarize(times["base"].primary)["median"],
                   "x_base_rounds": paired_ratios(times[name].primary, times["base"].primary),
                   "clock": times[name].clock}
            if "peft_unfused" in times and name == "tlora_mask":
                row["x_peft_unfused_rounds"] = paired_ratios(times[name].primary, times["peft_unfused"].primary)
            if memory:
                row["peak_mb"] = (peak_bytes(lambda: runners[name](0), device) or 0) / 2**20
            rows.append(row)
        del applied, runners
        gc.collect()
    log(f"[latency] {kind}/{size}: " + ", ".join(f"{r['variant']} {r['x_base']:.3f}x" for r in rows)
        + f" ({time.perf_counter() - t0:.0f} s)")
    return rows


def bench_scaling(kind: str, size: str, rank: int, warmup: int, reps: int, device: torch.device, dtype: torch.dtype,
                  batches: tuple[int, ...] = (1, 2, 4), tokens: tuple[int, ...] = (64, 256, 1024),
                  log: Callable[[str], None] = print) -> list[dict]:
    """Mask path and unfused PEFT vs base as the batch and the image token count grow (one interleaved run each)."""
    base = build_denoiser(kind, size, 0, device, dtype)
    targets = lora_targets(base)
    cfg = TLoRAConfig(rank, 1, 1.0)
    applied = {name: apply_variant(name, base, rank, targets, cfg) for name in ("base", "peft_unfused", "tlora_mask")}
    ts = sampling_timesteps()
    rows = []
    shapes = [(b, tokens[0]) for b in batches] + ([] if kind == "sdxl" else [(batches[0], n) for n in tokens[1:]])
    for batch, n in shapes:
        inputs = make_inputs(kind, size, base, seed=0, batch=batch, image_tokens=None if kind == "sdxl" else n)
        runners = {name: _runner(a, inputs, ts) for name, a in applied.items()}
        times = interleaved(runners, warmup, reps, device)
        row = {"model": kind, "size": size, "batch": batch, "image_tokens": None if kind == "sdxl" else n,
               "base_ms": summarize(times["base"].primary)["median"]}
        for name in ("peft_unfused", "tlora_mask"):
            row[f"{name}_x_base"] = paired_ratios(times[name].primary, times["base"].primary)["median"]
        rows.append(row)
        log(f"[scaling] {kind}/{size} batch {batch} tokens {n}: mask {row['tlora_mask_x_base']:.3f}x, "
            f"peft {row['peft_unfused_x_base']:.3f}x")
    return rows
