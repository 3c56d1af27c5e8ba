"""Loading into offloaded pipelines, through diffusers' own (private) offload toggles.

``diffusers.loaders.lora_base._func_optionally_disable_offloading`` removes accelerate's
model/sequential offload hooks (putting offloaded weights back) and reports what was on;
we re-enable them as ``load_lora_adapter`` does, on the device they ran on
(``pipe._offload_device``: diffusers' own re-enable assumes an accelerator). This is the
one module that reads those private names; ``tests/test_offload.py`` fails if diffusers changes them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

__all__ = ["offloading_disabled"]


@contextlib.contextmanager
def offloading_disabled(pipe: Any) -> Iterator[None]:
    """Run a block with the pipeline's offloading off (weights materialised), then turn it back on."""
    if pipe is None or isinstance(pipe, torch.nn.Module):
        yield
        return
    from diffusers.loaders.lora_base import _func_optionally_disable_offloading

    model, sequential, group = _func_optionally_disable_offloading(pipe)
    try:
        yield
    finally:
        device = getattr(pipe, "_offload_device", None)  # where offloading ran (diffusers forgets it on CPU)
        if model:
            pipe.enable_model_cpu_offload(device=device)
        elif sequential:
            pipe.enable_sequential_cpu_offload(device=device)
        elif group:
            from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading

            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module):
                    _maybe_remove_and_reapply_group_offloading(component)
