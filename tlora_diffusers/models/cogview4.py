"""CogView4: ``CogView4Pipeline`` passes scheduler units unchanged.

The loop passes ``timestep=t.expand(latents.shape[0])`` (diffusers 0.42.1
``pipelines/cogview4/pipeline_cogview4.py:622,628``), a ``(B,)`` tensor; CFG is a second,
separate call with the same timestep (line 642). It sets ``pipe._current_timestep = t``
(line 618).
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="cogview4",
    denoisers=("CogView4Transformer2DModel",),
    timestep_arg="timestep",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("transformer",),
    pipelines=("CogView4Pipeline",),
    default_targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
)
