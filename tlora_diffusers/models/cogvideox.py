"""CogVideoX (``CogVideoXTransformer3DModel``): the pipeline passes scheduler units unchanged.

``CogVideoXPipeline`` (diffusers 0.42.1, ``pipelines/cogvideo/pipeline_cogvideox.py`` line 727)
passes ``timestep=t.expand(B)`` with ``t`` an entry of ``scheduler.timesteps``
(``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler``, int64) and ``B`` the CFG-doubled
batch, and sets ``pipe._current_timestep = t`` (line 722). The DDIM/DPM schedulers keep no
``step_index``.
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="cogvideox",
    denoisers=("CogVideoXTransformer3DModel",),
    timestep_arg="timestep",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("transformer",),
    pipelines=(
        "CogVideoXPipeline", "CogVideoXImageToVideoPipeline", "CogVideoXVideoToVideoPipeline",
        "CogVideoXFunControlPipeline",
    ),
    # Joint attention over the concatenated text + video tokens and the feed-forward.
    default_targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    video=True,
)
