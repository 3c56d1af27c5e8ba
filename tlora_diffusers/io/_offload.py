"""Loading into offloaded pipelines, through diffusers' own (private) offload toggles.

``diffusers.loaders.lora_base._func_optionally_disable_offloading`` removes accelerate's
model/sequential offload hooks (putting offloaded weights back) and reports what was on;
we re-enable them as they were, on the device they ran on (diffusers' own re-enable assumes an
accelerator and offloads every component). This is the one module that reads those private names; ``tests/test_offload.py`` fails if diffusers changes them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

__all__ = ["offloading_disabled"]


def _hooks(pipe: Any) -> dict[str, tuple[str, Any]]:
    """Each component's accelerate offload hook: (``"model"`` or ``"sequential"``, its execution device)."""
    out = {}
    for name, component in pipe.components.items():
        hook = getattr(component, "_hf_hook", None) if isinstance(component, torch.nn.Module) else None
        if hook is None:
            continue
        inner = hook.hooks[0] if hasattr(hook, "hooks") and hook.hooks else hook
        kind = "model" if type(inner).__name__ == "CpuOffload" else "sequential"
        out[name] = (kind, getattr(inner, "execution_device", None))
    return out


@contextlib.contextmanager
def offloading_disabled(pipe: Any) -> Iterator[None]:
    """Run a block with the pipeline's offloading off (weights materialised), then turn it back on as it was.

    Model offload comes back through ``enable_model_cpu_offload`` on its device; sequential
    offload is re-applied to exactly the components that had it (``accelerate.cpu_offload``);
    group offloading through diffusers' own re-apply.
    """
    if pipe is None or isinstance(pipe, torch.nn.Module):
        yield
        return
    from diffusers.loaders.lora_base import _func_optionally_disable_offloading

    hooks = _hooks(pipe)
    model, sequential, group = _func_optionally_disable_offloading(pipe)
    try:
        yield
    finally:
        if model:
            device = next((d for k, d in hooks.values() if k == "model" and d is not None), None)
            pipe.enable_model_cpu_offload(device=device or getattr(pipe, "_offload_device", None))
        elif sequential:
            from accelerate import cpu_offload

            for name, (kind, device) in hooks.items():
                if kind == "sequential":
                    cpu_offload(getattr(pipe, name), execution_device=device)
        elif group:
            from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading

            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module):
                    _maybe_remove_and_reapply_group_offloading(component)
