"""Timestep conventions: what a pipeline passes its denoiser, converted back to scheduler units.

Each convention turns the timestep a stock pipeline hands its denoiser into the units of
the pipeline's own ``scheduler.timesteps`` (0 = clean, ``T = num_train_timesteps`` = pure
noise), once, at the boundary, as k-diffusion's ``external.py`` wrappers do. Masks and
layers only ever see scheduler units.

Integer timesteps survive a ``/ 1000`` round trip exactly: ``fl(t / 1000) * 1000`` misses
an integer ``t`` by an ulp in about 1 % of cases, which flips ``floor`` where the
schedule lands on a whole rank, so an integer whose forward map rounds to exactly the
received value is taken as the timestep (it is indistinguishable from the pipeline's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = ["Convention", "SCHEDULER_UNITS", "FRACTION", "REVERSED_FRACTION", "REVERSED_FRACTION_OF_T",
           "REVERSED", "ConfigScaled", "Scaled"]


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)  # MPS has no float64


@dataclass(frozen=True)
class Convention:
    """Base class: ``convention(t, module, T)`` returns ``t`` in scheduler units (float64).

    Subclasses implement :meth:`forward_map` (scheduler units → what the pipeline passes, as
    the pipeline computes it) and :meth:`inverse` (its exact inverse in float64).
    :attr:`description` is how the README and error messages name it.
    """

    @property
    def description(self) -> str:
        return "scheduler units"

    def forward_map(self, s: torch.Tensor, module: nn.Module, T: int) -> torch.Tensor:
        return s

    def inverse(self, t: torch.Tensor, module: nn.Module, T: int) -> torch.Tensor:
        return t

    def __call__(self, t: Any, module: nn.Module, T: int) -> torch.Tensor:
        t = torch.as_tensor(t)
        wide = self.inverse(_wide(t), module, T)
        if not t.is_floating_point() or type(self).inverse is Convention.inverse:
            return wide
        candidate = torch.round(wide)
        exact = self.forward_map(candidate, module, T).to(t.dtype) == t
        return torch.where(exact, candidate, wide)


@dataclass(frozen=True)
class Scaled(Convention):
    """The pipeline passes ``t / scale`` (Flux: ``scale=1000``)."""

    scale: float = 1000.0

    @property
    def description(self) -> str:
        return f"t / {self.scale:g}"

    def forward_map(self, s, module, T):
        return s / self.scale

    def inverse(self, t, module, T):
        return t * self.scale


@dataclass(frozen=True)
class _ReversedFraction(Convention):
    """The pipeline passes ``(scale - t) / scale``: 1 is clean, 0 pure noise (Z-Image)."""

    scale: float = 1000.0

    @property
    def description(self) -> str:
        return f"({self.scale:g} - t) / {self.scale:g} (reversed: 1 = clean)"

    def forward_map(self, s, module, T):
        return (self.scale - s) / self.scale

    def inverse(self, t, module, T):
        return self.scale - t * self.scale


@dataclass(frozen=True)
class _ReversedFractionOfT(Convention):
    """The pipeline passes ``1 - t / T`` with the scheduler's own ``T`` (Lumina2)."""

    @property
    def description(self) -> str:
        return "1 - t / T (reversed: 1 = clean)"

    def forward_map(self, s, module, T):
        return 1 - s / T

    def inverse(self, t, module, T):
        return (1 - t) * T


@dataclass(frozen=True)
class _Reversed(Convention):
    """The pipeline passes ``scale - t`` (Mochi: its scheduler runs with ``invert_sigmas``)."""

    scale: float = 1000.0

    @property
    def description(self) -> str:
        return f"{self.scale:g} - t (reversed: {self.scale:g} = clean)"

    def forward_map(self, s, module, T):
        return self.scale - s

    def inverse(self, t, module, T):
        return self.scale - t


@dataclass(frozen=True)
class ConfigScaled(Convention):
    """The pipeline passes ``t * module.config.<field>`` (Sana: ``timestep_scale``, default 1)."""

    field: str = "timestep_scale"

    @property
    def description(self) -> str:
        return f"t * transformer.config.{self.field}"

    def _scale(self, module: nn.Module) -> float:
        scale = getattr(getattr(module, "config", None), self.field, 1.0)
        if scale is None:
            scale = 1.0
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
            raise ValueError(f"{type(module).__name__}.config.{self.field} must be a number > 0, got {scale!r}")
        return float(scale)

    def forward_map(self, s, module, T):
        return s * self._scale(module)

    def inverse(self, t, module, T):
        return t / self._scale(module)


#: The pipeline passes scheduler units unchanged (UNet pipelines, SD3, Wan, LTX, ...).
SCHEDULER_UNITS = Convention()
#: The pipeline passes ``t / 1000`` and the model multiplies by 1000 inside (Flux, Qwen-Image, ...).
FRACTION = Scaled(1000.0)
#: ``(1000 - t) / 1000`` (Z-Image).
REVERSED_FRACTION = _ReversedFraction()
#: ``1 - t / T`` (Lumina2).
REVERSED_FRACTION_OF_T = _ReversedFractionOfT()
#: ``1000 - t`` (Mochi).
REVERSED = _Reversed()
