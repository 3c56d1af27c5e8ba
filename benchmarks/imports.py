"""How long ``import tlora_diffusers`` and ``tlora-diffusers --help`` take, in fresh interpreters (medians)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Callable

__all__ = ["bench_imports", "TARGETS"]

#: Seconds: import beyond ``import torch``; the CLI's --help and --version in total.
TARGETS = {"import_beyond_torch": 1.0, "cli_help": 1.5, "cli_version": 1.5}
_HEAVY = ("diffusers", "transformers", "peft", "matplotlib", "gradio", "lycoris")


def _time(args: list[str], n: int) -> float:
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        xs.append(time.perf_counter() - t0)
    return statistics.median(xs)


def _beyond_torch(n: int) -> float:
    """``from tlora_diffusers import TLoRAConfig, TLoRAPatch`` (what a script does; the package itself is lazy),
    timed inside fresh interpreters that imported torch first (median)."""
    code = ("import time, torch; t0 = time.perf_counter(); from tlora_diffusers import TLoRAConfig, TLoRAPatch; "
            "print(time.perf_counter() - t0)")
    return statistics.median(float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                                  text=True).stdout) for _ in range(n))


def bench_imports(n: int = 5, log: Callable[[str], None] = print) -> dict:
    py = sys.executable
    torch_s = _time([py, "-c", "import torch"], n)
    beyond_s = _beyond_torch(n)
    help_s = _time([py, "-m", "tlora_diffusers", "--help"], n)
    version_s = _time([py, "-m", "tlora_diffusers", "--version"], n)
    probe = ("import sys; from tlora_diffusers import TLoRAConfig, TLoRAPatch; "
             "print(','.join(m for m in %r if m in sys.modules))" % (_HEAVY,))
    loaded = subprocess.run([py, "-c", probe], check=True, capture_output=True, text=True).stdout.strip()
    result = {"python_import_torch_s": torch_s, "import_beyond_torch_s": beyond_s, "cli_help_s": help_s, "cli_version_s": version_s,
              "heavy_modules_imported": [m for m in loaded.split(",") if m], "targets_s": TARGETS}
    result["met"] = (result["import_beyond_torch_s"] <= TARGETS["import_beyond_torch"]
                     and help_s <= TARGETS["cli_help"] and version_s <= TARGETS["cli_version"])
    log(f"[imports] torch {torch_s:.2f} s; tlora_diffusers +{beyond_s:.3f} s; --help {help_s:.2f} s; "
        f"--version {version_s:.2f} s; heavy modules on import: {result['heavy_modules_imported'] or 'none'}")
    return result
