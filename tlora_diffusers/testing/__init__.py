"""Tiny, randomly initialised stock pipelines of every supported family, built offline in milliseconds.

Tests, the offline demo, the CLI tests and the benchmarks need the *stock* pipelines
(their timestep conventions, CFG paths and module names are what T-LoRA has to get
right) without downloading a weight, config or tokenizer. Each family has a module here
(``testing/<family>.py``) whose ``CASES`` are :class:`TinyCase`s: the real diffusers
pipeline class wired to small ``from_config`` models that keep the real architecture's
module names, plus the call arguments (prompt embeddings, 2 steps, a tiny size) that run
it without text encoders.

Example:
    >>> from tlora_diffusers.testing import tiny_case
    >>> case = tiny_case("flux")
    >>> pipe = case.build(0)
    >>> pipe(**case.inputs(pipe, 0)).images.shape
    (1, 16, 4)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["TinyCase", "tiny_case", "tiny_cases", "TINY_MODULES", "seeded"]

def _case_modules() -> tuple[str, ...]:
    """Every module of this package that defines ``CASES`` (all but the shared ``_parts``)."""
    import pkgutil

    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


#: Modules of this package that define ``CASES``: a family's tiny pipelines are one file here.
TINY_MODULES = _case_modules()


@dataclass(frozen=True)
class TinyCase:
    """One stock pipeline, tiny.

    Args:
        name: e.g. ``"flux-kontext"``; unique across families.
        family: the :class:`~tlora_diffusers.models.ModelFamily` name of its denoiser(s).
        pipeline: the diffusers pipeline class name.
        build: ``seed -> pipeline`` with every component seeded, in ``eval()`` mode, progress bar off.
        inputs: ``(pipe, seed) -> kwargs`` for ``pipe(**kwargs)``: embeddings instead of prompts
            where the pipeline allows it, 2 inference steps, a tiny size, ``output_type``
            ``"latent"`` or ``"np"``, a seeded CPU generator.
        lora_targets: PEFT ``target_modules`` for a test LoRA on each of ``denoiser_attrs``.
        denoiser_attrs: pipeline attributes whose denoisers tests put LoRAs on.
        per_token: the pipeline passes one timestep per token (``(B, seq)``) to its denoiser.
        fixed_calls: ``kwargs -> timestep or None``: calls the model runs at a timestep of its own,
            whatever the loop's (AnyFlow FAR fills its KV cache at 0 between chunks; Wan-Animate 2's
            reference pass runs at 1), in scheduler units; what the test reference masks them by.
    """

    name: str
    family: str
    pipeline: str
    build: Callable[[int], Any]
    inputs: Callable[[Any, int], dict]
    lora_targets: tuple[str, ...]
    denoiser_attrs: tuple[str, ...] = ("transformer",)
    per_token: bool = False
    fixed_calls: Optional[Callable[[dict], Optional[float]]] = None


_CASES: Optional[dict[str, TinyCase]] = None


def tiny_cases() -> dict[str, TinyCase]:
    """Every tiny case by name (importing each family's module once)."""
    global _CASES
    if _CASES is None:
        cases: dict[str, TinyCase] = {}
        for module in TINY_MODULES:
            for case in importlib.import_module(f"{__name__}.{module}").CASES:
                if case.name in cases:
                    raise ValueError(f"two tiny cases are named {case.name!r}")
                cases[case.name] = case
        _CASES = cases
    return dict(_CASES)


def tiny_case(name: str) -> TinyCase:
    cases = tiny_cases()
    if name not in cases:
        raise ValueError(f"unknown tiny case {name!r}; expected one of {sorted(cases)}")
    return cases[name]


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Run ``build`` under ``torch.manual_seed(seed)`` without disturbing the caller's RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
