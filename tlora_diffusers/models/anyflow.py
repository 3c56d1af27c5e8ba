"""AnyFlow and AnyFlow-FAR (``AnyFlowTransformer3DModel``, ``AnyFlowFARTransformer3DModel``): scheduler units, per frame.

``AnyFlowPipeline`` / ``AnyFlowFARPipeline`` (diffusers 0.42.1, ``pipelines/anyflow/pipeline_anyflow.py``
lines 586-591, ``pipeline_anyflow_far.py`` 742-746) pass ``timestep`` = ``t`` per latent frame, ``(B, F)``,
float64, 0 on context frames (video-to-video), and ``r_timestep``, the flow map's target time (the next
``t``): ``timestep`` is the diffusion timestep. Neither sets ``current_timestep``. Declared here because
a first call holding ``{1000, 0}`` fits ``t`` and ``1000 - t`` alike. Between chunks the FAR pipeline
calls the transformer once at ``t = r = 0`` to fill its KV cache (lines 403-444: ``kv_cache_flag
["is_cache_step"]`` is True for that call only): clean, every rank.
"""

from . import ModelFamily, conventions


def _cache_fill(kwargs) -> "float | None":
    flag = kwargs.get("kv_cache_flag")
    return 0.0 if isinstance(flag, dict) and flag.get("is_cache_step") else None

FAMILY = ModelFamily(
    name="anyflow",
    denoisers=("AnyFlowTransformer3DModel", "AnyFlowFARTransformer3DModel"),
    timestep_arg="timestep",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("transformer",),
    pipelines=("AnyFlowPipeline", "AnyFlowFARPipeline"),
    default_targets=("to_q", "to_k", "to_v", "to_out.0"),
    call_timestep=_cache_fill,
    video=True,
)
