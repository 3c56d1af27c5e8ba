"""Lumina-Image 2.0: ``Lumina2Pipeline`` passes ``1 - t / T`` (reversed: 1 = clean).

The loop computes ``current_timestep = 1 - t / self.scheduler.config.num_train_timesteps``
and expands it to ``(B,)`` (diffusers 0.42.1 ``pipelines/lumina2/pipeline_lumina2.py:673-675``,
passed at line 679); CFG is a second, separate call with the same timestep (line 690),
skipped once ``(i + 1) / steps > cfg_trunc_ratio``. The pipeline does not set
``_current_timestep``.
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="lumina2",
    denoisers=("Lumina2Transformer2DModel",),
    timestep_arg="timestep",
    convention=conventions.REVERSED_FRACTION_OF_T,
    pipeline_attrs=("transformer",),
    pipelines=("Lumina2Pipeline",),
    default_targets=(
        "to_q", "to_k", "to_v", "to_out.0",
        "feed_forward.linear_1", "feed_forward.linear_2", "feed_forward.linear_3",
    ),
)
