"""What a user waits for on a small, shared CPU machine: ``python benchmarks/front_door.py [--out DIR]``.

Each task runs as the user runs it (a fresh process, the command line, the shipped scenes model):

* ``generate``: ``tlora-diffusers generate --model scenes --lora scenes-example`` (one image, 25 steps);
* ``train``: ``tlora-diffusers train --model scenes`` for 20 steps on one image;
* ``app``: one request to the Gradio app's handler (``app.generate``: masked + unmasked image and the
  plot), after a first request has loaded the pipeline;
* ``demo``: ``tlora-diffusers demo`` as the README runs it (two trainings of 400 steps, the grid).

under two loads, the machine quiet and one other process keeping a core busy (a busy loop, as a
browser or a second job would), and two thread settings: ``auto`` (what the commands do: the CPUs this
process may use minus the busy ones, :mod:`tlora_diffusers.threads`) and ``per-core`` (torch's own
default, one thread per core, what the commands did before ``--threads``). Rounds are interleaved
(every task and setting once per round, the order rotating) and the medians reported; the demo runs
once per load with ``auto`` only, because with ``per-core`` threads on a busy machine it takes
about half an hour.

Results: ``<out>/front_door.json`` and ``.md``; the committed ones are in ``benchmarks/results/``
(``--out benchmarks/results``). The README's table is generated from the JSON (``--readme README.md``)
and a test keeps the two equal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
TASKS = ("generate", "train", "app")
SETTINGS = ("auto", "per-core")
LOADS = ("quiet", "busy")
BEGIN, END = "<!-- begin front-door-table -->", "<!-- end front-door-table -->"

_APP = """
import json, sys, time
sys.path.insert(0, {repo!r})
import app
app.generate(app.SCENES_MODEL, str(app.EXAMPLE_TLORA), "a sks shape", 25, 0)  # loads the pipeline
t0 = time.perf_counter()
app.generate(app.SCENES_MODEL, str(app.EXAMPLE_TLORA), "a sks shape on a blue background", 25, 1)
print(json.dumps({{"seconds": time.perf_counter() - t0, "threads": app.THREADS}}))
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tlora_diffusers.cli", *args]


def _command(task: str, work: Path, image: Path) -> list[str]:
    out = work / f"{task}-{time.monotonic_ns()}"
    if task == "generate":
        return _cli("generate", "--model", "scenes", "--lora", "scenes-example", "--prompt", "a sks shape",
                    "--out", str(out), "-q")
    if task == "train":
        return _cli("train", "--model", "scenes", "--images", str(image), "--prompt", "a sks shape", "--steps", "20",
                    "--out", str(out), "-q")
    if task == "demo":
        return _cli("demo", "--out", str(out), "-q")
    return [sys.executable, "-c", _APP.format(repo=str(REPO))]


def _run(task: str, setting: str, work: Path, image: Path) -> dict:
    """One timed run in a fresh process; the wall time the user waits."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)
    if setting == "per-core":
        env["TLORA_THREADS"] = str(os.cpu_count() or 1)
    else:
        env.pop("TLORA_THREADS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(_command(task, work, image), env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{task} ({setting}) failed:\n{proc.stderr[-2000:]}")
    if task == "app":  # the request alone, not the import and the first load
        seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    return {"seconds": seconds, "load_at_start": os.getloadavg()[0]}


def _wait_for_load(target: str, log) -> None:
    """Let the 1-minute load average settle: below 0.3 when quiet, above 0.7 with the busy loop."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 300:
        load = os.getloadavg()[0]
        if (target == "quiet" and load < 0.3) or (target == "busy" and load > 0.7):
            return
        time.sleep(5)
    log(f"[front_door] load average {os.getloadavg()[0]:.2f} after 5 min waiting for {target}; measuring anyway")


def measure(reps: int, demo: bool, log=print) -> dict:
    import torch

    from benchmarks.harness import machine

    work = Path(tempfile.mkdtemp(prefix="tlora-front-door-"))
    from PIL import Image

    image = work / "concept.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    rows, busy = [], None
    try:
        for load in LOADS:
            if load == "busy":
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            _wait_for_load(load, log)
            # Quiet, ``auto`` and one thread per core are the same count: only ``auto`` is run.
            runs = [(task, setting) for task in TASKS for setting in (SETTINGS if load == "busy" else ("auto",))]
            times: dict[tuple[str, str], list[float]] = {r: [] for r in runs}
            for i in range(reps):
                k = i % len(runs)
                for task, setting in runs[k:] + runs[:k]:
                    got = _run(task, setting, work, image)
                    times[(task, setting)].append(got["seconds"])
                    log(f"[front_door] {load} {task} {setting}: {got['seconds']:.1f} s (load {got['load_at_start']:.2f})")
            for (task, setting), xs in times.items():
                rows.append({"load": load, "task": task, "threads": setting, "median_s": statistics.median(xs),
                             "runs_s": xs})
            if demo:
                got = _run("demo", "auto", work, image)
                log(f"[front_door] {load} demo auto: {got['seconds']:.1f} s")
                rows.append({"load": load, "task": "demo", "threads": "auto", "median_s": got["seconds"],
                             "runs_s": [got["seconds"]]})
            if busy is not None:
                busy.kill()
                busy.wait()
                busy = None
    finally:
        if busy is not None:
            busy.kill()
        shutil.rmtree(work, ignore_errors=True)
    info = machine(torch.device("cpu"))
    info.pop("threads", None)  # per run: see the rows' settings
    return {"name": "front_door", "machine": info, "reps": reps, "rows": rows}


def _cell(result: dict, load: str, task: str, threads: str) -> Optional[float]:
    return next((r["median_s"] for r in result["rows"] if (r["load"], r["task"], r["threads"]) == (load, task, threads)),
                None)


def render_table(result: dict) -> str:
    """The README's table: seconds per task, quiet and busy, with ``auto`` and per-core threads."""
    tasks = [t for t in ("demo",) + TASKS if any(r["task"] == t for r in result["rows"])]
    what = {"generate": "`generate`, one image (process start to PNG)", "train": "`train`, 20 steps",
            "app": "app request (masked + unmasked + plot)", "demo": "`demo` (the README's command)"}
    lines = ["| task | quiet, auto | one core busy, auto | one core busy, one thread per core |", "|---|---:|---:|---:|"]
    for task in tasks:
        cells = [_cell(result, "quiet", task, "auto"), _cell(result, "busy", task, "auto"),
                 _cell(result, "busy", task, "per-core")]
        lines.append(f"| {what[task]} | " + " | ".join("–" if c is None else f"{c:.1f} s" for c in cells) + " |")
    m = result["machine"]
    lines += ["", f"Medians of {result['reps']} interleaved runs (the demo: one) on {m['cores']} CPU cores, torch "
                  f"{m['torch']}; \"one core busy\": another process runs a busy loop; `auto` is the commands' default "
                  "(`--threads auto`), \"one thread per core\" is torch's own default. Command: `python "
                  "benchmarks/front_door.py --out benchmarks/results --readme README.md`."]
    return "\n".join(lines)


def readme_with_table(text: str, table: str) -> str:
    from tlora_diffusers.models.docs import replace_between

    return replace_between(text, BEGIN, END, table)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench-out"), help="output folder (default: bench-out/)")
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds per load (default: 3)")
    p.add_argument("--no-demo", action="store_true", help="skip the demo (default: run it once per load)")
    p.add_argument("--readme", default=None, help="also rewrite this README's front-door table")
    p.add_argument("--render", default=None, metavar="JSON", help="only re-render an existing result (no runs)")
    args = p.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.render:
        result = json.loads(Path(args.render).read_text())
    else:
        result = measure(args.reps, not args.no_demo)
        result["command"] = "python benchmarks/front_door.py " + " ".join(argv if argv is not None else sys.argv[1:])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "front_door.json").write_text(json.dumps(result, indent=1))
        (out / "front_door.md").write_text(render_table(result) + "\n")
    if args.readme:
        path = Path(args.readme)
        path.write_text(readme_with_table(path.read_text(), render_table(result)))
    print(render_table(result))
    return result


if __name__ == "__main__":
    main()
