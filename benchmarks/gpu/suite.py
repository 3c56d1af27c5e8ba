"""The GPU suite: full-size SDXL, FLUX.1 [dev], FLUX.2 [klein] 4B and Qwen-Image, random weights, bf16.

    bash benchmarks/gpu/run.sh            # on the GPU machine (installs the carried wheels first)
    python -m benchmarks.gpu.suite --device cpu --size tiny --budget 120   # a dry run of the logic, here

Per model, one denoiser in memory: base (no adapter), PEFT LoRA unfused and fused, the mask
path (``TLoRAPatch``), LyCORIS ``tlora`` in bypass mode; eager per-call time and peak
memory; the compiled base and compiled mask path; and CUDA-graph replay of the mask path
(``torch.compile(mode="reduce-overhead")``): one graph across timesteps, outputs equal to
eager at each timestep. A time budget (default 420 s) skips what would not fit, in the
order listed, and says so in the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = ("flux2-klein", "sdxl", "flux", "qwen-image")
RANK = 64


def _timed(fn: Callable[[], Any], warmup: int, reps: int, device: Any) -> dict:
    import torch

    from benchmarks.harness import summarize, sync

    for _ in range(warmup):
        fn()
    xs = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        xs.append(time.perf_counter() - t0)
    stats = summarize(xs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        stats["peak_extra_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return stats


def bench_model(kind: str, size: str, device: Any, dtype: Any, warmup: int, reps: int, deadline: float,
                log: Callable[[str], None], skip: frozenset = frozenset()) -> dict:
    import torch
    import torch._dynamo

    from benchmarks.latency import sampling_timesteps
    from benchmarks.models import add_peft, build_denoiser, lora_targets, make_inputs
    from benchmarks.variants import lycoris_tlora
    from tlora_diffusers import TLoRAConfig, TLoRAPatch

    row: dict[str, Any] = {"model": kind, "size": size, "rank": RANK, "skipped": []}
    t0 = time.perf_counter()
    model = build_denoiser(kind, size, 0, device, dtype)
    row["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    inputs = make_inputs(kind, size, model, seed=0)
    ts = sampling_timesteps()
    state = {"i": 0}
    cfg = TLoRAConfig(RANK, 1, 1.0)

    def call(m: Any = None) -> Any:
        t = ts[state["i"] % len(ts)]
        state["i"] += 1
        args, kwargs = inputs.at(t)
        with torch.no_grad():
            return (model if m is None else m)(*args, **kwargs)

    row["base"] = _timed(call, warmup, reps, device)
    compile_ok = time.perf_counter() < deadline and "compiled" not in skip
    if compile_ok:
        torch._dynamo.reset()
        compiled_base = torch.compile(model)
        row["compiled_base"] = _timed(lambda: call(compiled_base), 3, reps, device)
    targets = lora_targets(model)
    row["layers"] = add_peft(model, RANK, targets)
    row["peft_unfused"] = _timed(call, warmup, reps, device)
    patch = TLoRAPatch(model, cfg)
    row["tlora_mask"] = _timed(call, warmup, reps, device)
    if compile_ok and time.perf_counter() < deadline:
        torch._dynamo.reset()
        compiled = torch.compile(model)
        row["compiled_tlora_mask"] = _timed(lambda: call(compiled), 3, reps, device)
        row["compiled_tlora_mask"]["x_compiled_base"] = (row["compiled_tlora_mask"]["median"]
                                                         / row["compiled_base"]["median"])
        log(f"[{kind}] compiled mask path {row['compiled_tlora_mask']['x_compiled_base']:.3f}x compiled base")
    else:
        row["skipped"].append("compiled")
    patch.remove()
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.merge()
    row["peft_fused"] = _timed(call, warmup, reps, device)
    for layer in layers:
        layer.unmerge()
    for name in ("peft_unfused", "peft_fused", "tlora_mask"):
        row[name]["x_base"] = row[name]["median"] / row["base"]["median"]
    log(f"[{kind}] eager: " + ", ".join(f"{n} {row[n]['x_base']:.3f}x" for n in ("peft_unfused", "peft_fused",
                                                                             "tlora_mask")))
    if device.type == "cuda" and kind == "flux2-klein" and time.perf_counter() < deadline and "cuda_graphs" not in skip:
        row["cuda_graphs"] = _cuda_graph_replay(model, cfg, inputs, reps, device)
        log(f"[{kind}] CUDA graphs: {row['cuda_graphs']}")
    elif kind == "flux2-klein":
        row["skipped"].append("cuda_graphs")
    if time.perf_counter() < deadline and "lycoris_bypass" not in skip:
        model.delete_adapters("default")
        import copy

        lyco_model = copy.deepcopy(model) if size == "tiny" else model
        applied = lycoris_tlora(lyco_model, RANK, targets, cfg, bypass=True, svd_init=False)

        def lyco() -> Any:
            t = ts[state["i"] % len(ts)]
            state["i"] += 1
            args, kwargs = inputs.at(t)
            with torch.no_grad():
                return applied.call(args, kwargs, t)

        row["lycoris_bypass"] = _timed(lyco, warmup, reps, device)
        row["lycoris_bypass"]["x_base"] = row["lycoris_bypass"]["median"] / row["base"]["median"]
    else:
        row["skipped"].append("lycoris_bypass")
    row["seconds"] = time.perf_counter() - t0
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _cuda_graph_replay(model: Any, cfg: Any, inputs: Any, reps: int, device: Any) -> dict:
    """The mask path under CUDA graphs: one recorded graph replayed at every timestep, outputs as eager."""
    import torch
    import torch._dynamo

    from tlora_diffusers import TLoRAPatch

    patch = TLoRAPatch(model, cfg)
    try:
        def run(m: Any, t: float) -> Any:
            args, kwargs = inputs.at(t)
            with torch.no_grad():
                return m(*args, **kwargs)[0].clone()

        eager = {t: run(model, t) for t in (950.0, 500.0, 50.0)}
        torch._dynamo.reset()
        graphed = torch.compile(model, mode="reduce-overhead")
        for t in (900.0, 800.0, 700.0):  # warm-up and record
            run(graphed, t)
        graphs = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
        same = {t: bool(torch.allclose(run(graphed, t), eager[t], atol=2e-2, rtol=2e-2)) for t in eager}
        timing = _timed(lambda: run(graphed, 600.0), 2, reps, device)
        return {"graphs_recorded": graphs, "new_graphs_after_warmup":
                torch._dynamo.utils.counters["stats"].get("unique_graphs", 0) - graphs,
                "outputs_match_eager": same, "median_ms": timing["median"]}
    finally:
        patch.remove()


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="full", choices=("tiny", "mid", "full"))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--budget", type=float, default=420.0, help="seconds before optional parts are skipped")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--out", default=str(REPO / "bench-out"))
    p.add_argument("--skip", default="", help="comma-separated optional parts: compiled,cuda_graphs,lycoris_bypass")
    args = p.parse_args(argv)
    skip = frozenset(filter(None, args.skip.split(",")))
    unknown = sorted(skip - {"compiled", "cuda_graphs", "lycoris_bypass"})
    if unknown:
        p.error(f"--skip: unknown {unknown}; choose from compiled, cuda_graphs, lycoris_bypass")
    import torch

    from benchmarks.harness import machine

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # a dry run on a shared CPU
    started = time.perf_counter()
    deadline = started + args.budget
    result: dict[str, Any] = {"name": f"gpu-{args.size}", "machine": machine(device), "dtype": str(dtype),
                              "command": "python -m benchmarks.gpu.suite " + " ".join(argv or sys.argv[1:]),
                              "models": []}
    for kind in args.models.split(","):
        if time.perf_counter() > deadline:
            result.setdefault("skipped_models", []).append(kind)
            continue
        try:
            result["models"].append(bench_model(kind, args.size, device, dtype, 2, args.reps, deadline, print,
                                              skip))
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
            result["models"].append({"model": kind, "error": f"out of memory: {e}"})
            torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result['name']}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
