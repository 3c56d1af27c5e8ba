"""Which layers a T-LoRA trains: PEFT's matching rules, resolved to explicit module paths."""

from __future__ import annotations

import re
from typing import Sequence, Union

import torch.nn as nn

__all__ = ["default_targets", "resolve_targets", "check_rank"]

def default_targets(denoiser: nn.Module) -> list[str]:
    """The denoiser's model family's default LoRA targets (SimpleTuner's LyCORIS T-LoRA presets:
    the Linear layers of the attention and feed-forward blocks)."""
    from ..models import family_of

    family = family_of(denoiser)
    if not family.default_targets:
        raise ValueError(
            f"model family {family.name!r} ({type(denoiser).__name__}) has no default LoRA targets; pass "
            "target_modules=[...] (module names such as 'to_q', or regexes over full module paths)"
        )
    return list(family.default_targets)


def resolve_targets(denoiser: nn.Module, targets: Union[str, Sequence[str]]) -> list[str]:
    """Full paths of the Linear/Conv2d layers ``targets`` selects.

    A list selects modules whose path equals an entry or ends with ``"." + entry``; an
    entry that is not a plain dotted name is a regex matched against the full path. A
    single string is a regex over full paths (PEFT's rules).
    """
    if isinstance(targets, str):
        patterns = [re.compile(targets)]
        names = []
    else:
        names = [t for t in targets if re.fullmatch(r"[\w.]+", t)]
        patterns = [re.compile(t) for t in targets if not re.fullmatch(r"[\w.]+", t)]
    found = []
    for path, module in denoiser.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not path:
            continue
        if any(path == n or path.endswith("." + n) for n in names) or any(p.fullmatch(path) for p in patterns):
            found.append(path)
    if not found:
        raise ValueError(
            f"target modules {targets!r} match no Linear or Conv2d layer of {type(denoiser).__name__}; "
            "use module names such as 'to_q' or 'ff.net.0.proj', or a regex over full module paths"
        )
    return found


def check_rank(denoiser: nn.Module, paths: Sequence[str], rank: int) -> None:
    """A rank larger than ``min(in, out)`` of a targeted layer cannot be trained (or SVD-initialised)."""
    modules = dict(denoiser.named_modules())
    for path in paths:
        m = modules[path]
        out_f = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        in_f = m.in_features if isinstance(m, nn.Linear) else m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        if rank > min(out_f, in_f):
            raise ValueError(
                f"rank {rank} is larger than targeted layer {path} allows ({out_f}x{in_f}, at most "
                f"{min(out_f, in_f)}); lower --rank or leave this layer out of the targets"
            )
