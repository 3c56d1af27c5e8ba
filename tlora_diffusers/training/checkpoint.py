"""Training checkpoints: safetensors + JSON only (no pickles), written atomically.

A checkpoint is a folder ``checkpoint-<step>`` built as ``.checkpoint-<step>.tmp`` and
renamed when complete, so an interrupted write never looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint"]


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _own(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent contiguous CPU copies (masked weights may be views of one buffer; safetensors refuses those)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def save_checkpoint(
    folder: Path, step: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
    generator: torch.Generator, info: dict[str, Any], keep: int = 2, grads: bool = False,
) -> Path:
    """Write ``folder/checkpoint-<step>`` atomically and keep the newest ``keep`` checkpoints.

    ``grads``: also save the parameters' accumulated gradients (a checkpoint in the middle of
    a gradient-accumulation cycle), so a resumed run continues the cycle bit for bit.
    """
    from safetensors.torch import save_file

    final = folder / f"checkpoint-{step}"
    tmp = folder / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(_own(params), tmp / "params.safetensors")
    save_file(_own(opt_tensors) or {"_empty": torch.zeros(0)}, tmp / "optimizer.safetensors")
    if grads:
        pending = {k: p.grad for k, p in params.items() if p.grad is not None}
        save_file(_own(pending) or {"_empty": torch.zeros(0)}, tmp / "grads.safetensors")
    save_file({"generator": generator.get_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, **info}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(_checkpoints(folder), key=lambda p: p[0])[:-keep] if keep else []:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    out = []
    for p in folder.glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if p.is_dir() and suffix.isdigit() and (p / "state.json").is_file():
            out.append((int(suffix), p))
    return out


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = _checkpoints(folder)
    return max(found)[1] if found else None


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> dict[str, Any]:
    """Restore parameters, optimizer and RNG in place; returns the JSON state (step, losses, ...)."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    saved = load_file(path / "params.safetensors")
    if set(saved) != set(params):
        raise ValueError(f"{path}: checkpoint parameters do not match this run (different targets or variant)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    opt_tensors = load_file(path / "optimizer.safetensors")
    opt_tensors.pop("_empty", None)
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in opt_tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    for key, value in state["optimizer"]["scalars"].items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    generator.set_state(load_file(path / "rng.safetensors")["generator"])
    grads = path / "grads.safetensors"
    if grads.is_file():
        saved_grads = load_file(grads)
        saved_grads.pop("_empty", None)
        for name, p in params.items():
            p.grad = saved_grads[name].to(p.device, p.dtype) if name in saved_grads else None
    return state
