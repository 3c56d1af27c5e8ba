"""Timestep conventions: what a pipeline passes its denoiser, as an affine map of scheduler units.

Every stock pipeline hands its denoiser ``raw = (s - origin) * scale`` of the loop timestep
``s`` (an entry of ``scheduler.timesteps``: 0 = clean, ``T = num_train_timesteps`` = pure
noise): ``s`` itself (UNet pipelines, SD3, Wan), ``s / 1000`` (Flux), ``(1000 - s) / 1000``
(Z-Image), ``1 - s / T`` (Lumina2), ``1000 - s`` (Mochi), ``s * config.timestep_scale``
(Sana). A :class:`Convention` is that one map; ``scale`` and ``origin`` may name ``T`` or
a field of the denoiser's config. It converts once, at the boundary, as k-diffusion's
``external.py`` wrappers do; masks and layers only ever see scheduler units.

:data:`KNOWN` lists the conventions the patch tries when a denoiser class has none declared
(:mod:`tlora_diffusers.runtime.infer`).

Integer timesteps survive a ``/ 1000`` round trip exactly: ``fl(t / 1000) * 1000`` misses
an integer ``t`` by an ulp in about 1 % of cases, which flips ``floor`` where the schedule
lands on a whole rank, so an integer whose forward map rounds to exactly the received value
is taken as the timestep (it is indistinguishable from the pipeline's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn as nn

__all__ = ["Convention", "SCHEDULER_UNITS", "FRACTION", "FRACTION_OF_T", "REVERSED_FRACTION", "REVERSED_FRACTION_OF_T",
           "REVERSED", "REVERSED_OF_T", "ConfigScaled", "Scaled", "KNOWN"]

#: A constant, ``"T"`` / ``"1/T"`` / ``"-1/T"`` (the scheduler's ``num_train_timesteps``) or ``"config.<field>"``.
Term = Union[float, str]


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)  # MPS has no float64


def _term(term: Term, module: nn.Module, T: int) -> float:
    if not isinstance(term, str):
        return float(term)
    if term == "T":
        return float(T)
    if term == "1/T":
        return 1.0 / T
    if term == "-1/T":
        return -1.0 / T
    field = term.removeprefix("config.")
    value = getattr(getattr(module, "config", None), field, None)
    if value is None:
        value = 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{type(module).__name__}.config.{field} must be a number > 0, got {value!r}")
    return float(value)


def _show(term: Term) -> str:
    if isinstance(term, str):
        return term.replace("config.", "transformer.config.")
    return f"{term:g}"


@dataclass(frozen=True)
class Convention:
    """``raw = (s - origin) * scale``: what the pipeline passes for scheduler timestep ``s``.

    ``convention(raw, module, T)`` returns ``s`` (float64); ``forward_map(s, module, T)`` is
    the pipeline's own computation. :attr:`description` names it in errors and the README.
    """

    scale: Term = 1.0
    origin: Term = 0.0
    name: str = ""

    def __post_init__(self) -> None:
        for field, value in (("scale", self.scale), ("origin", self.origin)):
            if isinstance(value, str):
                if value not in ("T", "1/T", "-1/T") and not (value.startswith("config.") and value[7:].isidentifier()):
                    raise ValueError(f"Convention.{field} must be a number, 'T', '1/T', '-1/T' or 'config.<field>', got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Convention.{field} must be a number, 'T', '1/T' or 'config.<field>', got {value!r}")
        if not isinstance(self.scale, str) and self.scale == 0:
            raise ValueError("Convention.scale must not be 0")

    @property
    def description(self) -> str:
        if self.name:
            return self.name
        s = "t" if self.origin in (0, 0.0) else f"({_show(self.origin)} - t)"
        if self.scale in (1, 1.0):
            return s
        if self.scale in (-1, -1.0):
            return s.strip("()")
        if isinstance(self.scale, str):
            return f"{s} / T" if self.scale == "1/T" else f"{s} * {_show(self.scale)}"
        return f"{s} * {self.scale:g}" if abs(self.scale) >= 1 else f"{s} / {1 / abs(self.scale):g}"

    def terms(self, module: nn.Module, T: int) -> tuple[float, float]:
        """``(scale, origin)`` as numbers for this denoiser and ``T``."""
        return _term(self.scale, module, T), _term(self.origin, module, T)

    def forward_map(self, s: torch.Tensor, module: nn.Module, T: int) -> torch.Tensor:
        scale, origin = self.terms(module, T)
        return (s - origin) * scale if origin else s * scale

    def inverse(self, raw: torch.Tensor, module: nn.Module, T: int) -> torch.Tensor:
        scale, origin = self.terms(module, T)
        return raw / scale + origin

    def __call__(self, raw: Any, module: nn.Module, T: int) -> torch.Tensor:
        raw = torch.as_tensor(raw)
        wide = self.inverse(_wide(raw), module, T)
        if not raw.is_floating_point() or self.terms(module, T) == (1.0, 0.0):
            return wide
        candidate = torch.round(wide)
        exact = self.forward_map(candidate, module, T).to(raw.dtype) == raw
        return torch.where(exact, candidate, wide)

    def slope(self, module: nn.Module, T: int) -> float:
        """``|d s / d raw|``: how far one unit of ``raw`` moves ``s``."""
        return 1.0 / abs(self.terms(module, T)[0])

    def magnitude(self, module: nn.Module, T: int) -> float:
        """``|origin * scale|``: the size of the operands of the pipeline's subtraction (rounding scales with it)."""
        scale, origin = self.terms(module, T)
        return abs(origin * scale)


def Scaled(scale: float = 1000.0) -> Convention:
    """The pipeline passes ``t / scale`` (Flux: ``scale=1000``)."""
    return Convention(scale=1.0 / scale)


def ConfigScaled(field: str = "timestep_scale") -> Convention:
    """The pipeline passes ``t * module.config.<field>`` (Sana: ``timestep_scale``, default 1)."""
    return Convention(scale=f"config.{field}")


#: The pipeline passes scheduler units unchanged (UNet pipelines, SD3, Wan, LTX, ...).
SCHEDULER_UNITS = Convention()
#: ``t / 1000``; the model multiplies by 1000 inside (Flux, Qwen-Image, Chroma, AuraFlow, ...).
FRACTION = Convention(scale=1 / 1000)
#: ``t / T`` with the scheduler's own ``T``.
FRACTION_OF_T = Convention(scale="1/T")
#: ``(1000 - t) / 1000`` (Z-Image).
REVERSED_FRACTION = Convention(scale=-1 / 1000, origin=1000.0, name="(1000 - t) / 1000 (reversed: 1 = clean)")
#: ``1 - t / T`` (Lumina2).
REVERSED_FRACTION_OF_T = Convention(scale="-1/T", origin="T", name="1 - t / T (reversed: 1 = clean)")
#: ``1000 - t`` (Mochi: its scheduler runs with ``invert_sigmas``).
REVERSED = Convention(scale=-1.0, origin=1000.0, name="1000 - t (reversed: 1000 = clean)")
#: ``T - t``.
REVERSED_OF_T = Convention(scale=-1.0, origin="T", name="T - t (reversed: T = clean)")
#: What the patch tries, in this order, for a denoiser class that declares no convention.
KNOWN = (SCHEDULER_UNITS, FRACTION_OF_T, FRACTION, REVERSED_FRACTION_OF_T, REVERSED_FRACTION, REVERSED_OF_T, REVERSED,
         ConfigScaled("timestep_scale"))
