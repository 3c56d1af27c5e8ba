"""Which layers a T-LoRA trains: PEFT's matching rules, resolved to explicit module paths."""

from __future__ import annotations

import re
from typing import Sequence, Union

import torch.nn as nn

__all__ = ["DEFAULT_TARGETS", "resolve_targets", "check_rank"]

#: Per-model defaults matching SimpleTuner's LyCORIS T-LoRA presets (attention + feed-forward
#: blocks: ``Attention``/``FeedForward``; Flux2: ``Flux2Attention``, ``Flux2FeedForward``,
#: ``Flux2ParallelSelfAttention``), expressed as the Linear layers inside those blocks.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "UNet2DConditionModel": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    "FluxTransformer2DModel": [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    ],
    "Flux2Transformer2DModel": [
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
        "ff_context.linear_out", "attn.to_qkv_mlp_proj", r"single_transformer_blocks.\d+.attn.to_out",
    ],
}


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
