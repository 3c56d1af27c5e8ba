"""Which LoRA-capable diffusers pipelines a T-LoRA is masked on, and why the others are refused.

Every pipeline class of the installed diffusers that can load a LoRA (classic pipelines with
``load_lora_weights``, modular ones too) gets one status:

* ``tested``: a tiny stock case of that pipeline (:mod:`tlora_diffusers.testing`) equals an
  independent reference in the test suite;
* ``masked``: its denoiser classes are tested through other pipelines; every call is still checked
  against this pipeline's own loop (a convention that does not fit is an error, never a silent mask);
* ``refused``: patching raises with the reason below.

:func:`pipeline_support` imports diffusers (docs and tests only; ``import tlora_diffusers`` never does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["REFUSED_DENOISERS", "SupportRow", "lora_pipelines", "denoiser_classes", "pipeline_support", "refusal_of"]

#: Denoiser classes a T-LoRA cannot be masked on, and why (raised by ``TLoRAPatch``).
REFUSED_DENOISERS = {
    "MiniMaxH3Transformer3DModel": (
        "MiniMax-H3 packs text, video and audio rows into one sequence and passes only the distinct noise levels "
        "of its rows (timestep of shape (num_unique,), counting from 0 = noise to 1 = clean, with a per-row "
        "timestep_indices), on a scheduler without num_train_timesteps; per-row T-LoRA masks for that packing "
        "are not implemented, so no mask could be trusted. Load the file as an ordinary LoRA (without TLoRAPatch) "
        "only if it is one"
    ),
    "PriorTransformer": (
        "Stable unCLIP's prior runs a loop of its own (pipe.prior_scheduler) before the UNet's, which the masks "
        "follow, and diffusers' load_lora_weights never puts a LoRA there: load the T-LoRA into the UNet"
    ),
    "RFD4ProteinaTransformer": (
        "RFD4-Proteina is conditioned on two independent diffusion times per call (bb_ca_time and "
        "local_latents_time, each from its own scheduler, 0 = noise), and a T-LoRA has one rank schedule r(t): "
        "there is no single t to mask by"
    ),
}


def refusal_of(cls: type) -> Optional[str]:
    """Why a T-LoRA cannot be masked on denoisers of ``cls`` (or a base class), or ``None``."""
    for klass in cls.__mro__:
        reason = REFUSED_DENOISERS.get(klass.__name__)
        if reason:
            return f"{cls.__name__}: {reason}"
    return None


@dataclass(frozen=True)
class SupportRow:
    pipeline: str
    denoisers: tuple[str, ...]
    status: str  # "tested", "masked" or "refused"
    detail: str  # the tiny cases, the cases its denoisers are tested in, or the reason


def lora_pipelines() -> dict[str, type]:
    """Every pipeline class of the installed diffusers that has ``load_lora_weights``, by name."""
    import diffusers

    out = {}
    for name in dir(diffusers):
        if not name.endswith("Pipeline"):
            continue
        try:
            cls = getattr(diffusers, name)
            ok = isinstance(cls, type) and hasattr(cls, "load_lora_weights")
        except Exception:  # a dummy object for a missing optional backend
            ok = False
        if ok:
            out[name] = cls
    return out


def denoiser_classes(cls: type) -> tuple[str, ...]:
    """The denoiser classes a pipeline class is built with (``__init__`` annotations; a modular
    pipeline's default blocks' expected components)."""
    import inspect

    import diffusers

    names: list[str] = []
    blocks_name = getattr(cls, "default_blocks_name", None)
    if blocks_name:
        blocks_cls = getattr(diffusers, blocks_name, None)
        if blocks_cls is None:
            import diffusers.modular_pipelines as modular

            blocks_cls = getattr(modular, blocks_name, None)
        try:
            specs = blocks_cls().expected_components if blocks_cls is not None else []
        except Exception:
            specs = []
        names = [getattr(s.type_hint, "__name__", "") for s in specs]
    else:
        import sys

        scope = vars(sys.modules[cls.__module__])
        for param in inspect.signature(cls.__init__).parameters.values():
            annotation = param.annotation
            text = annotation if isinstance(annotation, str) else str(annotation)
            if isinstance(annotation, type):
                text = annotation.__name__
            names += re.findall(r"([A-Za-z0-9_]+)(?=\s*(?:\||\]|,|$))", text.replace("diffusers.", ""))
        names = [n.split(".")[-1] for n in names if n]
        return tuple(n for n in dict.fromkeys(names) if _denoiser(n, scope))
    seen = dict.fromkeys(n.split(".")[-1] for n in names if n)
    return tuple(n for n in seen if _denoiser(n))


def _denoiser(name: str, scope: Optional[dict] = None) -> bool:
    import diffusers
    import torch

    from . import model_families
    from .generic import timestep_parameter

    try:
        cls = (scope or {}).get(name) or getattr(diffusers, name, None)
        if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
            return False
    except Exception:  # a dummy object for a missing optional backend (scipy, librosa, ...)
        return False
    if name in REFUSED_DENOISERS:
        return True
    family_classes = {d for f in model_families().values() for d in f.denoisers}
    return any(c.__name__ in family_classes for c in cls.__mro__) or timestep_parameter(cls) is not None


def pipeline_support(cases: Optional[dict[str, Any]] = None) -> list[SupportRow]:
    """One :class:`SupportRow` per LoRA-capable pipeline class, sorted by name."""
    from ..testing import tiny_cases

    cases = tiny_cases() if cases is None else cases
    by_pipeline: dict[str, list[str]] = {}
    for case in cases.values():
        by_pipeline.setdefault(case.pipeline, []).append(case.name)
    pipelines = lora_pipelines()
    denoisers = {name: denoiser_classes(cls) for name, cls in pipelines.items()}
    tested_classes: dict[str, list[str]] = {}
    for name, case_names in by_pipeline.items():
        for denoiser in denoisers.get(name, ()):
            tested_classes.setdefault(denoiser, []).extend(case_names)
    rows = []
    for name in sorted(pipelines):
        classes = denoisers[name]
        refused = [c for c in classes if c in REFUSED_DENOISERS]
        note = "".join(f" (a LoRA on {c} is refused)" for c in refused)
        if refused and len(refused) == len(classes):
            rows.append(SupportRow(name, classes, "refused", REFUSED_DENOISERS[refused[0]]))
            continue
        classes_masked = tuple(c for c in classes if c not in refused)
        if name in by_pipeline:
            rows.append(SupportRow(name, classes, "tested", ", ".join(sorted(by_pipeline[name])) + note))
        elif classes_masked and all(c in tested_classes for c in classes_masked):
            via = sorted({case for c in classes_masked for case in tested_classes[c]})
            rows.append(SupportRow(name, classes, "masked",
                                   ", ".join(via[:3]) + (", ..." if len(via) > 3 else "") + note))
        else:
            rows.append(SupportRow(name, classes, "unknown", "no tiny case covers its denoiser classes"))
    return rows
