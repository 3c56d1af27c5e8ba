"""AnyFlow and AnyFlow-FAR (``AnyFlowTransformer3DModel``, ``AnyFlowFARTransformer3DModel``): scheduler units, per frame.

``AnyFlowPipeline`` / ``AnyFlowFARPipeline`` (diffusers 0.42.1, ``pipelines/anyflow/pipeline_anyflow.py``
lines 586-591, ``pipeline_anyflow_far.py`` 742-746) pass ``timestep`` = ``t`` per latent frame, ``(B, F)``,
float64, 0 on context frames (video-to-video), and ``r_timestep``, the flow map's target time (the next
``t``): ``timestep`` is the diffusion timestep. Neither sets ``current_timestep``. Declared here because
a first call holding ``{1000, 0}`` fits ``t`` and ``1000 - t`` alike. Between chunks the FAR pipeline
calls the transformer once at ``t = r = 0`` to fill its KV cache (clean: every rank).
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="anyflow",
    denoisers=("AnyFlowTransformer3DModel", "AnyFlowFARTransformer3DModel"),
    timestep_arg="timestep",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("transformer",),
    pipelines=("AnyFlowPipeline", "AnyFlowFARPipeline"),
    default_targets=("to_q", "to_k", "to_v", "to_out.0"),
    video=True,
)
