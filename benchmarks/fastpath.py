"""Does merging the active ranks into the weights (v0.1's ``fast=True``) beat the mask path? Measured and modelled.

The fast path did, per denoiser call, ``W += scaling · B[:, lo:hi] @ A[lo:hi]`` for the ranks that
became active since the previous call, then ran the base layer alone; the weights were
saved before the run's first merge and copied back after its last call. The mask path runs
PEFT's unfused branch ``B(A(x) · m)``. Per step and layer (N tokens, d_in x d_out weight,
rank R, Δr ranks added per step, b bytes per element):

* base:        2·N·d_in·d_out FLOPs;  (d_in·d_out + N·d_in + N·d_out)·b bytes
* LoRA branch: 2·N·R·(d_in + d_out) FLOPs;  (R·(d_in + d_out) + N·d_in + 3·N·d_out + 2·N·R)·b bytes
  (``x`` read again, ``h`` written and read, the output read and written by the add)
* merge:       2·Δr·d_in·d_out FLOPs;  2·d_in·d_out·b bytes (``W`` read and written), plus per run
  one copy of ``W`` saved and one restored (memory: one extra copy of every adapted weight)

On a GPU each term costs ``max(FLOPs / peak, bytes / bandwidth)``: :func:`roofline` applies it
to a model's layers. :func:`measure` times the three on this machine at full widths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Layer", "FLUX1_LAYERS", "SDXL_LAYERS", "roofline", "measure", "H200"]


@dataclass(frozen=True)
class Layer:
    d_in: int
    d_out: int
    tokens: int  # rows this layer sees per call (image + text tokens, CFG batch included)
    count: int = 1


def _flux1_layers(image_tokens: int = 4096, text_tokens: int = 512) -> list[Layer]:
    """FLUX.1 [dev]'s trainer-default targets: 19 double blocks (image and text streams) and 38 single blocks."""
    n, t, d = image_tokens, text_tokens, 3072
    double = [Layer(d, d, n, 4), Layer(d, d, t, 4), Layer(d, 4 * d, n, 1), Layer(4 * d, d, n, 1),
              Layer(d, 4 * d, t, 1), Layer(4 * d, d, t, 1)]  # to_q/k/v/out, add_*_proj/to_add_out, ff, ff_context
    single = [Layer(d, d, n + t, 3), Layer(d + 4 * d, d, n + t, 1)]  # attention q/k/v, proj_out
    return [Layer(L.d_in, L.d_out, L.tokens, L.count * 19) for L in double] + \
           [Layer(L.d_in, L.d_out, L.tokens, L.count * 38) for L in single]


def _sdxl_layers(px: int = 1024, cfg_batch: int = 2) -> list[Layer]:
    """SDXL's attention + feed-forward targets by level (transformer blocks: 1x2 at 64², 2x2 at 32², 10x3 at 16²...)."""
    out = []
    for side, width, blocks in ((px // 16, 640, 2 * 2 + 3 * 2), (px // 32, 1280, 10 * 2 + 10 * 3 + 10)):
        n = side * side * cfg_batch
        out += [Layer(width, width, n, 4 * blocks), Layer(width, width, n, blocks),  # attn1 q/k/v/out, attn2 q/out
                Layer(2048, width, 77 * cfg_batch, 2 * blocks),  # attn2 k/v (text)
                Layer(width, 8 * width, n, blocks), Layer(4 * width, width, n, blocks)]  # ff (GEGLU in = 2x4x)
    return out


FLUX1_LAYERS = _flux1_layers()
SDXL_LAYERS = _sdxl_layers()
#: NVIDIA H200 SXM: bf16 dense tensor-core peak and HBM3e bandwidth (datasheet).
H200 = {"name": "H200", "flops": 989e12, "bandwidth": 4.8e12}


def _terms(L: Layer, rank: int, delta_rank: float, b: int) -> dict[str, tuple[float, float]]:
    """(FLOPs, bytes) per call of each part, for one layer."""
    n, i, o, r = L.tokens, L.d_in, L.d_out, rank
    return {
        "base": (2 * n * i * o, (i * o + n * i + n * o) * b),
        "branch": (2 * n * r * (i + o), (r * (i + o) + n * i + 3 * n * o + 2 * n * r) * b),
        "merge": (2 * delta_rank * i * o, 2 * i * o * b),
    }


def roofline(layers: list[Layer], rank: int, steps: int, device: dict = H200, bytes_per_el: int = 2) -> dict:
    """Predicted per-call time of base, mask path (base + branch) and fast path (base + merge + restore/steps).

    ``base_ms`` is the adapted layers' own matmuls only: the whole call (attention, the layers
    not adapted, convolutions, norms) is longer, so ``*_x_base`` overstates both paths' share
    of a real call; ``*_extra_ms`` are what each adds in absolute terms.
    """
    def seconds(flops: float, nbytes: float) -> float:
        return max(flops / device["flops"], nbytes / device["bandwidth"])

    totals = {"base": 0.0, "branch": 0.0, "merge": 0.0, "restore": 0.0, "weight_bytes": 0.0}
    for L in layers:
        for name, (flops, nbytes) in _terms(L, rank, rank / steps, bytes_per_el).items():
            totals[name] += L.count * seconds(flops, nbytes)
        totals["restore"] += L.count * seconds(0, 2 * 2 * L.d_in * L.d_out * bytes_per_el) / steps  # save + restore
        totals["weight_bytes"] += L.count * L.d_in * L.d_out * bytes_per_el
    base = totals["base"]
    return {"device": device["name"], "rank": rank, "steps": steps, "base_ms": base * 1e3,
            "mask_extra_ms": totals["branch"] * 1e3, "fast_extra_ms": (totals["merge"] + totals["restore"]) * 1e3,
            "mask_x_base": (base + totals["branch"]) / base,
            "fast_x_base": (base + totals["merge"] + totals["restore"]) / base,
            "fast_extra_memory_gib": totals["weight_bytes"] / 2**30}


def _median(fn: Callable[[], object], reps: int) -> float:
    fn()
    xs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    return sorted(xs)[len(xs) // 2]


@torch.no_grad()
def measure(d_in: int = 3072, d_out: int = 3072, tokens: tuple[int, ...] = (1024, 4096), rank: int = 64,
            steps: int = 28, reps: int = 5, dtype: torch.dtype = torch.float32,
            log: Callable[[str], None] = print) -> list[dict]:
    """Time one full-width layer per call on this machine: base, base + LoRA branch, merge step + base."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d_out, d_in, generator=g).to(dtype)
    a = torch.randn(rank, d_in, generator=g).to(dtype) * 0.01
    b = torch.randn(d_out, rank, generator=g).to(dtype) * 0.01
    saved = w.clone()
    dr = max(1, rank // steps)
    rows = []
    for n in tokens:
        x = torch.randn(n, d_in, generator=g).to(dtype)
        base = _median(lambda: x @ w.T, reps)
        branch = _median(lambda: x @ w.T + (x @ a.T) @ b.T, reps)

        def merged() -> torch.Tensor:
            w.addmm_(b[:, :dr], a[:dr])  # the ranks that became active this step
            return x @ w.T

        fast = _median(merged, reps)
        restore = _median(lambda: w.copy_(saved), reps)
        fast += 2 * restore / steps  # the save and the restore, once per run
        rows.append({"d_in": d_in, "d_out": d_out, "tokens": n, "rank": rank, "steps": steps, "base_ms": base * 1e3,
                     "mask_x_base": branch / base, "fast_x_base": fast / base,
                     "fast_extra_mb": w.numel() * w.element_size() / 2**20})
        log(f"[fastpath] {d_in}x{d_out}, {n} tokens: LoRA branch {branch / base:.3f}x, merge {fast / base:.3f}x")
        w.copy_(saved)
    return rows
