"""The timestep contract, checked: converted timesteps must be the pipeline's own loop timesteps.

At the first call of each denoiser in a pipeline run the converted timestep is compared
with the loop's: ``pipe.current_timestep`` where the pipeline sets it (diffusers' cache
hooks read the same attribute), else ``scheduler.timesteps[step_index]`` (or
``[begin_index]``), else membership in ``scheduler.timesteps``. Every call checks that
it lies in ``[0, T]`` (beyond float rounding it is an error, never a clamp).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["check_scheduler", "check_range", "verify_first_call", "tolerance"]


def tolerance(raw: Any, T: int) -> float:
    """How far a converted timestep may be from the loop's: the rounding of the dtype it was passed in."""
    dtype = raw.dtype if isinstance(raw, torch.Tensor) else torch.float64
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(1e-4, 4 * eps) * T


def check_scheduler(pipe: Any) -> None:
    """Refuse schedulers whose timesteps are not training timesteps (EDM's ``c_noise = 0.25·log σ``)."""
    scheduler = getattr(pipe, "scheduler", None)
    name = type(scheduler).__name__
    if hasattr(scheduler, "precondition_noise") or name.startswith("EDM"):
        raise ValueError(
            f"{type(pipe).__name__} samples with {name}, whose timesteps are EDM noise levels (the UNet receives "
            "c_noise = 0.25·log σ, about -1.6 … 1.1), not training timesteps 0..T: a T-LoRA's rank schedule "
            "r(t) is defined over training timesteps, so it cannot be masked correctly here. Sample with a "
            "scheduler whose timesteps are training timesteps (EulerDiscreteScheduler, DPMSolverMultistepScheduler, "
            "DDIMScheduler, ...): pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)"
        )


def _out_of_range(where: str, convention: str, value: float, T: int) -> ValueError:
    return ValueError(
        f"{where} received a timestep that converts ({convention}) to t={value:.6g}, outside [0, T={T}]: "
        "the model family's timestep convention does not fit this call (or T is wrong); a T-LoRA "
        "cannot be masked at that t. Register the right convention with register_model_family"
    )


def check_range(t: torch.Tensor, raw: Any, T: int, where: str, convention: str) -> torch.Tensor:
    """``t`` (scheduler units) clamped to ``[0, T]``; beyond float rounding it is an error.

    On the CPU the check reads the values directly; elsewhere it is a device-side assert
    (no host sync).
    """
    tol = tolerance(raw, T)
    if t.device.type == "cpu" and t.numel() == 1 and not t.requires_grad:  # one value: read it, no tensor ops
        value = float(t)
        if value < -tol or value > T + tol:
            raise _out_of_range(where, convention, value, T)
        return t if 0.0 <= value <= T else t.clamp(0.0, float(T))  # NaN stays NaN: the schedule refuses it
    bad = (t < -tol) | (t > T + tol)
    if t.device.type == "cpu":
        if bool(bad.any()):
            raise _out_of_range(where, convention, t[bad].reshape(-1)[0].item(), T)
    elif not torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), f"{where}: a converted timestep lies outside [0, T={T}]")
    return t.clamp(0.0, float(T))


def _scheduler_entry(scheduler: Any) -> tuple[Optional[float], str, Optional[torch.Tensor]]:
    name = type(scheduler).__name__
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
        return None, name, None
    for attr in ("step_index", "begin_index"):
        try:
            index = getattr(scheduler, attr, None)
        except Exception:  # a scheduler property that cannot answer yet
            index = None
        if isinstance(index, int) and 0 <= index < len(timesteps):
            return float(timesteps[index]), f"{name}.timesteps[{attr}={index}]", None
    return None, f"{name}.timesteps", timesteps.detach().double().cpu()


def verify_first_call(pipe: Any, t: torch.Tensor, raw: Any, T: int, where: str, family: Any) -> bool:
    """Compare this call's converted ``t`` with the pipeline's loop timestep; returns whether ``t`` is uniform.

    Raises a ``ValueError`` naming the denoiser, the value received, the value expected and
    how to register a conversion when they disagree.
    """
    values = t.detach().double().reshape(-1).cpu()
    received = float(values.max())  # per-token calls: the noisiest token is the loop's t
    uniform = bool((values == values[0]).all())
    tol = tolerance(raw, T)
    current = getattr(pipe, "_current_timestep", None)
    expected, source, candidates = None, "", None
    if current is not None:
        expected, source = float(torch.as_tensor(current).double().reshape(-1).max()), "pipe.current_timestep"
    else:
        expected, source, candidates = _scheduler_entry(pipe.scheduler)
    if expected is not None:
        ok = abs(received - expected) <= tol
    elif candidates is not None:
        nearest = float(candidates[(candidates - received).abs().argmin()])
        ok, expected, source = abs(received - nearest) <= tol, nearest, f"the nearest of {source}"
    else:
        return uniform  # nothing to compare with (a scheduler without timesteps)
    if not ok:
        raw_value = torch.as_tensor(raw).detach().reshape(-1)[0].item()
        raise ValueError(
            f"{where}: at the first denoiser call of this {type(pipe).__name__} run the denoiser received "
            f"{family.timestep_arg}={raw_value:.6g}, which model family {family.name!r} converts "
            f"({family.convention.description}) to t={received:.6g}, but the pipeline's loop is at "
            f"t={expected:.6g} ({source}). The family's timestep convention does not match this pipeline, so the "
            "masks would be wrong. Register the right conversion: tlora_diffusers.models.register_model_family("
            f"ModelFamily(name={family.name!r}, denoisers=..., timestep_arg=..., convention=...), replace=True)"
        )
    return uniform
