"""The T-LoRA mask configuration: a validated, immutable, serialisable dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["TLoRAConfig", "CONFIG_FORMAT_VERSION", "MAX_SUPPORTED_RANK", "LAYOUTS"]

#: How LoRA ranks map to schedule ranks. ``plain``: LoRA rank ``max_rank``, rank i is
#: schedule rank i. ``paired``: LoRA rank ``2 * max_rank``, LoRA ranks ``2i`` and
#: ``2i + 1`` share schedule rank i (an orthogonal T-LoRA written as an exact PEFT LoRA).
LAYOUTS = ("plain", "paired")

#: Version of the dictionary written by :meth:`TLoRAConfig.to_dict`.
CONFIG_FORMAT_VERSION = 1

#: Ranks above this are refused: a LoRA rank of 65k is a typo, not a configuration.
MAX_SUPPORTED_RANK = 65536


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TLoRAConfig:
    """Rank schedule of a T-LoRA (Soboleva et al. 2025, arXiv 2507.05964, eq. 6).

    At timestep ``t`` of a schedule with ``T`` training timesteps the first
    ``r = floor(((T - t) / T) ** alpha * (max_rank - min_rank)) + min_rank``
    ranks are active and the rest are masked.

    Args:
        max_rank: the LoRA rank; all ranks are active at ``t = 0``.
        min_rank: ranks active at the noisiest timestep ``t = T``; in ``[0, max_rank]``.
        alpha: schedule exponent; ``1.0`` is linear, larger values keep fewer ranks
            active at high noise for longer.
        layout: ``"plain"`` (a LoRA of rank ``max_rank``) or ``"paired"`` (rank
            ``2 * max_rank``, two LoRA ranks per schedule rank; see :data:`LAYOUTS`).

    Example:
        >>> cfg = TLoRAConfig(max_rank=64, min_rank=1, alpha=1.0)
        >>> TLoRAConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    max_rank: int
    min_rank: int = 1
    alpha: float = 1.0
    layout: str = "plain"

    def __post_init__(self) -> None:
        if not _is_int(self.max_rank) or not 1 <= self.max_rank <= MAX_SUPPORTED_RANK:
            raise ValueError(
                f"TLoRAConfig.max_rank must be an int in [1, {MAX_SUPPORTED_RANK}], got {self.max_rank!r}"
            )
        if not _is_int(self.min_rank) or not 0 <= self.min_rank <= self.max_rank:
            raise ValueError(
                f"TLoRAConfig.min_rank must be an int in [0, max_rank={self.max_rank}], got {self.min_rank!r}"
            )
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"TLoRAConfig.alpha must be a finite number > 0, got {alpha!r}")
        object.__setattr__(self, "alpha", float(alpha))
        if self.layout not in LAYOUTS:
            raise ValueError(f"TLoRAConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")

    @property
    def lora_rank(self) -> int:
        """The rank of the LoRA layers this schedule masks."""
        return self.max_rank * (2 if self.layout == "paired" else 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with a format version; inverse of :meth:`from_dict`."""
        return {
            "format_version": CONFIG_FORMAT_VERSION,
            "max_rank": self.max_rank,
            "min_rank": self.min_rank,
            "alpha": self.alpha,
            "layout": self.layout,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TLoRAConfig":
        """Rebuild a config written by :meth:`to_dict`; unknown keys and versions are errors."""
        if not isinstance(data, Mapping):
            raise ValueError(f"TLoRAConfig.from_dict expects a mapping, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("format_version", CONFIG_FORMAT_VERSION)
        if version != CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"TLoRAConfig format_version must be {CONFIG_FORMAT_VERSION}, got {version!r}; "
                "upgrade tlora_diffusers to read this file"
            )
        unknown = sorted(set(data) - {"max_rank", "min_rank", "alpha", "layout"})
        if unknown:
            raise ValueError(
                f"TLoRAConfig.from_dict got unknown keys {unknown}; allowed: max_rank, min_rank, alpha, layout"
            )
        if "max_rank" not in data:
            raise ValueError("TLoRAConfig.from_dict needs 'max_rank'")
        return cls(**data)

    @classmethod
    def from_lycoris_config(cls, data: Mapping[str, Any]) -> "TLoRAConfig":
        """Read SimpleTuner's LyCORIS JSON (``lycoris_config.json``) for ``algo: tlora``.

        ``linear_dim`` is the rank (max_rank); ``tlora_min_rank`` and ``tlora_alpha``
        default to 1 and 1.0 as in SimpleTuner. ``linear_alpha`` is the LoRA scale,
        not the schedule exponent, and is ignored here.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a LyCORIS config must be a JSON object, got {type(data).__name__}")
        algo = data.get("algo", "tlora")
        if algo != "tlora":
            raise ValueError(f"LyCORIS config 'algo' must be 'tlora' for a T-LoRA, got {algo!r}")
        if "linear_dim" not in data:
            raise ValueError("LyCORIS config needs 'linear_dim' (the T-LoRA max_rank)")
        return cls(
            max_rank=data["linear_dim"],
            min_rank=data.get("tlora_min_rank", 1),
            alpha=data.get("tlora_alpha", 1.0),
        )
