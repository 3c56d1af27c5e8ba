"""The pipeline loop's own timestep: where a run's masks come from.

During a pipeline run the loop timestep ``t`` (an entry of ``scheduler.timesteps``, exact,
in scheduler units) is readable without touching the denoiser's argument:

1. ``pipe.current_timestep``, which most pipelines set at the top of each step (diffusers'
   cache hooks read the same property);
2. ``scheduler.timesteps[scheduler.step_index]`` once the loop has stepped;
3. before the first step, a modular pipeline's guiders (``guider.get_state()["timestep"]``,
   set by ``guider.set_state(step=i, ..., timestep=t)``; Wan 2.2 has one per expert, and only
   the active one is current, so their readings are candidates the call must match), else
   ``scheduler.timesteps[begin_index]``.

Where none answers (schedulers without ``step_index``, e.g. DDIM, whose integer timesteps
the pipeline passes unchanged), the caller matches the converted argument to the nearest
entry of ``scheduler.timesteps``. A scheduler with ``invert_sigmas`` (Mochi) counts up; its
entries are turned back into training timesteps. Schedulers whose timesteps are not
training timesteps are refused before a run starts (:func:`scheduler_refusal`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["LoopClock", "scheduler_refusal", "pipeline_refusal", "components_of"]

_EDM = (
    "whose timesteps are EDM noise levels (the denoiser receives c_noise = 0.25·log σ, about -1.6 … 1.1), not "
    "training timesteps 0..T: a T-LoRA's rank schedule r(t) is defined over training timesteps, so it cannot be "
    "masked correctly here"
)


def components_of(pipe: Any) -> dict[str, Any]:
    """A pipeline's components by name (a classic or a modular pipeline), without loading anything."""
    found = {}
    names = getattr(pipe, "_component_specs", None) or {}
    for name in list(names) + list(vars(pipe)):
        value = vars(pipe).get(name)
        if value is not None and name not in found:
            found[name] = value
    return found


def scheduler_refusal(pipe: Any) -> Optional[str]:
    """Why ``pipe.scheduler`` cannot drive a T-LoRA (its timesteps are not training timesteps), with the fix."""
    scheduler = components_of(pipe).get("scheduler")
    if scheduler is None:
        return None
    name = type(scheduler).__name__
    if hasattr(scheduler, "precondition_noise") or name.startswith("EDM"):
        return (
            f"{type(pipe).__name__} samples with {name}, {_EDM}. Sample with a scheduler whose timesteps are training "
            "timesteps (EulerDiscreteScheduler, DPMSolverMultistepScheduler, DDIMScheduler, ...): pipe.scheduler = "
            "EulerDiscreteScheduler.from_config(pipe.scheduler.config)"
        )
    config = getattr(scheduler, "config", None)
    # EulerDiscreteScheduler's timesteps become 0.25·log σ with continuous timesteps and v-prediction
    if getattr(config, "timestep_type", None) == "continuous" and getattr(config, "prediction_type", None) == "v_prediction":
        return (
            f"{type(pipe).__name__} samples with {name}(timestep_type='continuous'), {_EDM}. Sample with discrete "
            f"timesteps: pipe.scheduler = {name}.from_config(pipe.scheduler.config, timestep_type='discrete')"
        )
    return None


#: Pipelines whose denoiser is conditioned on a noise level by design (no scheduler change helps).
_NOISE_LEVEL_PIPELINES = {
    "StableDiffusionLatentUpscalePipeline": "its UNet receives c_noise = 0.25·log σ by design (an EDM-style model)",
}


def pipeline_refusal(pipe: Any) -> Optional[str]:
    """Why no T-LoRA can be masked on this pipeline at all, or ``None``."""
    for cls in type(pipe).__mro__:
        reason = _NOISE_LEVEL_PIPELINES.get(cls.__name__)
        if reason:
            return (f"{cls.__name__} cannot run a T-LoRA: {reason}, not training timesteps 0..T, and no scheduler "
                    "changes that; use a pipeline whose denoiser takes training timesteps")
    return scheduler_refusal(pipe)


def _as_loop(value: Any) -> torch.Tensor:
    """0-d, or 1-d when the loop holds one timestep per frame (diffusion forcing) or per sample."""
    if isinstance(value, torch.Tensor):
        t = value
    else:  # a Python number: an int stays an integer timestep (it may be a truncated one)
        t = torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64)
    t = t.detach()
    if t.ndim == 0:
        return t
    t = t.reshape(-1)
    if t.numel() == 1 or (t.device.type == "cpu" and bool((t == t[0]).all())):
        return t[0]
    return t


class LoopClock:
    """Reads one pipeline's loop timestep during its run (see the module docstring)."""

    __slots__ = ("pipe", "scheduler", "guiders", "_current")

    def __init__(self, pipe: Any) -> None:
        components = components_of(pipe)
        self.pipe = pipe
        self.scheduler = components.get("scheduler")
        self.guiders = [v for k, v in components.items()
                        if not k.startswith("_") and "guider" in k and callable(getattr(v, "get_state", None))]
        self._current = isinstance(getattr(type(pipe), "current_timestep", None), property)

    @property
    def T(self) -> Optional[int]:
        return getattr(getattr(self.scheduler, "config", None), "num_train_timesteps", None)

    def _index(self, attr: str) -> Optional[int]:
        try:
            index = getattr(self.scheduler, attr, None)
        except Exception:  # a scheduler property that cannot answer yet
            return None
        timesteps = getattr(self.scheduler, "timesteps", None)
        if isinstance(index, int) and isinstance(timesteps, torch.Tensor) and 0 <= index < len(timesteps):
            return index
        return None

    def now(self) -> tuple[Optional[torch.Tensor], str]:
        """``(t, source)``: the loop's timestep (0-d, or one per frame), or ``(None, why)``: then match
        the call to :meth:`candidates`."""
        name = type(self.scheduler).__name__
        index = self._index("step_index")
        if self._current:
            current = self.pipe.current_timestep
            if current is not None:
                if not isinstance(current, torch.Tensor) and index is not None:
                    # a Python number (Cosmos 2.5: int(t), truncated): the scheduler's entry is the exact one
                    exact = self._training(self.scheduler.timesteps[index].detach())
                    if abs(float(exact) - float(current)) < 1:
                        return exact, f"{name}.timesteps[step_index={index}]"
                return _as_loop(current), "pipe.current_timestep"
        if index is not None:
            return self._training(self.scheduler.timesteps[index].detach()), f"{name}.timesteps[step_index={index}]"
        if self.guiders:
            return None, "the guiders' timesteps"
        index = self._index("begin_index")
        if index is not None:
            return self._training(self.scheduler.timesteps[index].detach()), f"{name}.timesteps[begin_index={index}]"
        return None, f"{name}.timesteps"

    def _training(self, t: torch.Tensor) -> torch.Tensor:
        """Scheduler timesteps as training timesteps.

        A scheduler with ``invert_sigmas`` (Mochi) counts up: ``T - t``. ``SCMScheduler`` (Sana Sprint)
        counts TrigFlow angles ``θ``; the flow-matching time of ``θ`` is ``sin θ / (sin θ + cos θ)``
        (TrigFlow, Lu & Song 2024, eq. 17), in training units ``T`` times that.
        """
        config = getattr(self.scheduler, "config", None)
        if getattr(config, "invert_sigmas", False):
            return self.T - t.to(torch.float64)
        if type(self.scheduler).__name__ == "SCMScheduler":
            theta = t.to(torch.float64)
            return self.T * torch.sin(theta) / (torch.sin(theta) + torch.cos(theta))
        return t

    def candidates(self) -> Optional[torch.Tensor]:
        """What a call must match when :meth:`now` cannot say: the guiders' current timesteps (before the
        first step of a modular loop) and every entry of ``scheduler.timesteps`` (float64)."""
        timesteps = self.timesteps()
        if self.guiders:  # a guider may still hold the previous segment's timestep: one candidate among others
            readings = [g.get_state().get("timestep") for g in self.guiders]
            values = [torch.as_tensor(r).detach().to(torch.float64).reshape(-1)[:1] for r in readings if r is not None]
            if timesteps is not None:
                values.append(timesteps)
            if values:
                return torch.cat([v.to(values[-1].device) for v in values])
        return timesteps

    def timesteps(self) -> Optional[torch.Tensor]:
        """Every entry of ``scheduler.timesteps`` as training timesteps (float64)."""
        timesteps = getattr(self.scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
            return None
        return self._training(timesteps.detach().to(torch.float64).reshape(-1))
