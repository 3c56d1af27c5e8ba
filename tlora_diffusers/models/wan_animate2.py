"""Wan-Animate 2 (``WanAnimate2Transformer3DModel``): scheduler units; the reference pass runs at ``t = 1``.

``WanAnimate2ModularPipeline`` (diffusers 0.42.1, ``modular_pipelines/wan_animate_2/denoise.py``) resets
its scheduler for every segment, calls the transformer once with ``kv_cache_mode="extract"`` to cache the
reference image's keys and values, then denoises with ``timestep = torch.stack([t])`` (scheduler units,
uncast) and ``kv_cache_mode="cached"``, its guider holding ``t``. The extraction call passes
``timesteps[0]``, but the model replaces it: ``timestep * 0 + 1 if kv_cache_mode == "extract"``
(``models/transformers/transformer_wan_animate_2.py:857``), so that pass is masked at ``t = 1``.
"""

from . import ModelFamily, conventions


def _reference_pass(kwargs) -> "float | None":
    return 1.0 if kwargs.get("kv_cache_mode") == "extract" else None


FAMILY = ModelFamily(
    name="wan-animate2",
    denoisers=("WanAnimate2Transformer3DModel",),
    timestep_arg="timestep",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("transformer",),
    pipelines=("WanAnimate2ModularPipeline", "WanAnimate2DistilledModularPipeline"),
    default_targets=("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"),
    call_timestep=_reference_pass,
    video=True,
)
