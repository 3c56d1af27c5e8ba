"""Run the benchmarks: ``python benchmarks/bench.py [--quick] [--out DIR] [--only host,latency,...]``.

Results go to ``--out`` (default ``bench-out/``, ignored by git): ``NAME.json`` (everything,
machine included) and ``NAME.md`` (the tables). The committed results in
``benchmarks/results/`` are updated only on purpose, with ``--out benchmarks/results``.

examples:
  python benchmarks/bench.py --quick                       # tiny models, ~2 min on 2 cores
  python benchmarks/bench.py --size mid                    # real widths, few blocks: ~20 min here
  python benchmarks/bench.py --size mid --only host,staleness,imports
  bash benchmarks/gpu/run.sh                               # the GPU suite (full size, bf16): see its README
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/bench.py` from anywhere
    sys.path.insert(0, str(REPO))

PARTS = ("latency", "scaling", "host", "staleness", "fastpath", "training", "compiled", "imports")
#: size -> (rank, warm-up, reps, models)
PLANS = {"tiny": (8, 3, 30, ("sdxl", "flux", "flux2-klein")), "mid": (64, 1, 6, ("sdxl", "flux", "flux2-klein"))}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, fewer repetitions (default: off)")
    p.add_argument("--size", choices=tuple(PLANS), default="tiny", help="model size (default: tiny)")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts (default: all: {','.join(PARTS)})")
    p.add_argument("--out", default=str(REPO / "bench-out"), help="output folder (default: bench-out/, not tracked)")
    p.add_argument("--name", default=None, help="file stem (default: quick-cpu, or SIZE-cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per variant (default: per size)")
    p.add_argument("--merge", action="store_true",
                   help="replace only the parts run in an existing NAME.json (each part keeps the command that "
                        "made it, under 'commands') (default: off, write a new file)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only.split(",")) - set(PARTS))
    if unknown:
        p.error(f"--only: unknown {unknown}; choose from {', '.join(PARTS)}")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    import torch

    from benchmarks import compiled, fastpath, host, imports, latency, training
    from benchmarks.harness import machine
    from benchmarks.report import render_markdown

    torch.set_num_threads(args.threads)
    size = "tiny" if args.quick else args.size
    rank, warmup, reps, models = PLANS[size]
    reps = args.reps or (max(10, reps // 2) if args.quick else reps)
    parts = args.only.split(",")
    device, dtype = torch.device("cpu"), torch.float32
    name = args.name or ("quick-cpu" if args.quick else f"{size}-cpu")
    result: dict = {"name": name, "command": "python benchmarks/bench.py " + " ".join(argv or sys.argv[1:]),
                    "machine": machine(device), "size": size}
    started = time.perf_counter()
    if "latency" in parts:
        result["latency"] = [row for kind in models
                             for row in latency.bench_latency(kind, size, rank, warmup, reps, device, dtype)]
    if "scaling" in parts:
        result["scaling"] = [row for kind in models[:2]
                             for row in latency.bench_scaling(kind, size, rank, warmup, max(3, reps // 2), device, dtype,
                                                              tokens=(64, 256) if args.quick else (64, 256, 1024))]
    if "host" in parts:
        counts = (10, 100, 700) if args.quick else (10, 30, 100, 300, 700, 1000)
        result["host"] = host.bench_host(counts, 8, 6 if args.quick else 40, 10 if args.quick else 20)
    if "staleness" in parts:
        result["staleness"] = host.bench_staleness()
    if "fastpath" in parts:
        tokens = (256,) if args.quick else (1024, 4096)
        result["fastpath"] = {
            "measured": fastpath.measure(tokens=tokens, reps=3 if args.quick else 5),
            "roofline": {"FLUX.1 [dev] 1024²": fastpath.roofline(fastpath.FLUX1_LAYERS, 32, 28),
                         "SDXL 1024²": fastpath.roofline(fastpath.SDXL_LAYERS, 64, 25)},
        }
    if "training" in parts:
        result["training"] = [row for kind in models[:2]
                              for row in training.bench_training(kind, size, rank, 1, max(3, reps // 2), device)]
    if "compiled" in parts and not args.quick:
        result["compiled"] = [compiled.bench_compiled("flux", size, rank, 1, reps, device)]
    if "imports" in parts:
        result["imports"] = imports.bench_imports(3 if args.quick else 5)
    result["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["commands"] = {part: result["command"] for part in PARTS if part in result}
    if args.merge and (out / f"{name}.json").exists():
        old = json.loads((out / f"{name}.json").read_text())
        commands = old.get("commands") or {part: old["command"] for part in PARTS if part in old}
        commands.update(result["commands"])
        seconds = old.get("seconds", 0) + result["seconds"]
        old.update({k: v for k, v in result.items() if k in PARTS})
        result = {**old, "commands": commands, "seconds": seconds}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{name}.md").write_text(render_markdown(result))
    print(f"wrote {out / name}.json and .md ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
