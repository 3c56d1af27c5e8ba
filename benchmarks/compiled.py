"""``torch.compile``: the compiled mask path against the compiled base model, and no recompile across timesteps."""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch

from tlora_diffusers import TLoRAConfig, TLoRAPatch

from .harness import interleaved, paired_ratios, summarize
from .latency import sampling_timesteps
from .models import add_peft, build_denoiser, lora_targets, make_inputs

__all__ = ["bench_compiled"]


def bench_compiled(kind: str, size: str, rank: int, warmup: int, reps: int, device: torch.device,
                   dtype: torch.dtype = torch.float32, log: Callable[[str], None] = print) -> dict:
    import torch._dynamo

    t0 = time.perf_counter()
    base = build_denoiser(kind, size, 0, device, dtype)
    targets = lora_targets(base)
    masked = copy.deepcopy(base)
    add_peft(masked, rank, targets)
    patch = TLoRAPatch(masked, TLoRAConfig(rank, 1, 1.0))
    inputs = make_inputs(kind, size, base, seed=0)
    ts = sampling_timesteps()
    torch._dynamo.reset()
    compiled = {"base": torch.compile(base), "tlora_mask": torch.compile(masked)}
    counters = torch._dynamo.utils.counters

    def runner(model: Any) -> Callable[[int], Any]:
        def run(i: int) -> Any:
            args, kwargs = inputs.at(ts[i % len(ts)])
            with torch.no_grad():
                return model(*args, **kwargs)
        return run

    runners = {k: runner(m) for k, m in compiled.items()}
    compile_s = time.perf_counter()
    for run in runners.values():
        run(0)
    compile_s = time.perf_counter() - compile_s
    frames = dict(counters["stats"])
    times = interleaved(runners, warmup, reps, device)
    recompiles = counters["stats"].get("unique_graphs", 0) - frames.get("unique_graphs", 0)
    result = {"model": kind, "size": size, "rank": rank, "compile_seconds": compile_s,
              "base_ms": summarize(times["base"].primary)["median"],
              "tlora_mask_ms": summarize(times["tlora_mask"].primary)["median"],
              "x_compiled_base": paired_ratios(times["tlora_mask"].primary, times["base"].primary)["median"],
              "graphs_after_warmup": recompiles, "timesteps": len(ts)}
    patch.remove()
    log(f"[compiled] {kind}/{size}: compiled mask path {result['x_compiled_base']:.3f}x compiled base, "
        f"{recompiles} new graphs over {reps + warmup} calls at new timesteps ({time.perf_counter() - t0:.0f} s)")
    return result
