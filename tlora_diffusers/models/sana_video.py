"""Sana Video (``SanaVideoTransformer3DModel``): scheduler units.

``SanaVideoPipeline`` (diffusers 0.42.1, ``pipelines/sana_video/pipeline_sana_video.py`` line 947) passes
``t`` unchanged, ``(2B,)`` int64 in one batched CFG call; ``SanaImageToVideoPipeline`` (``pipeline_sana_
video_i2v.py`` 993-994) passes ``t * (1 - mask)`` per latent position, ``(2B, 1, F, H, W)`` float32, 0 on
the image frame. Neither sets ``current_timestep``. Declared because a first call holding ``{t, 0}``
fits ``t`` and ``T - t`` alike. Its tokens are patches of those positions (patch ``(1, 2, 2)``), so no
layer is a token layer: every layer is masked by each sample's noisiest position (the loop's ``t``).
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="sana-video",
    denoisers=("SanaVideoTransformer3DModel",),
    timestep_arg="timestep",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("transformer",),
    pipelines=("SanaVideoPipeline", "SanaImageToVideoPipeline"),
    default_targets=("to_q", "to_k", "to_v", "to_out.0"),
    video=True,
)
