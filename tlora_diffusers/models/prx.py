"""PRX (``PRXTransformer2DModel``): the pipelines pass ``t / 1000``.

``PRXPipeline`` and ``PRXPixelPipeline`` (diffusers 0.42.1, ``pipelines/prx/``) pass
``timestep = t.float() / 1000`` with ``t`` an entry of a flow-matching scheduler's timesteps, and
set no ``current_timestep``. With the stock ``shift=1`` the schedule ends at ``t=1``, so the first
call's ``1.0`` would also fit ``t`` in scheduler units: declared here instead of inferred.
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="prx",
    denoisers=("PRXTransformer2DModel",),
    timestep_arg="timestep",
    convention=conventions.FRACTION,
    pipeline_attrs=("transformer",),
    pipelines=("PRXPipeline", "PRXPixelPipeline"),
    default_targets=("to_q", "to_k", "to_v", "to_out.0"),
)
