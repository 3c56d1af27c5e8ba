"""SkyReels-V2 (``SkyReelsV2Transformer3DModel``): scheduler units; diffusion forcing passes one timestep per frame.

The text-/image-to-video pipelines pass ``timestep=t.expand(B)`` (int64, scheduler units) and set
``pipe._current_timestep = t``. The three diffusion-forcing pipelines (diffusers 0.42.1,
``pipelines/skyreels_v2/pipeline_skyreels_v2_diffusion_forcing.py``) loop over rows of a step matrix:
``t`` is one timestep per latent frame ``(F,)`` (an entry of the scheduler's timesteps, 999 for a frame
not started, 0 for a done or clean prefix frame), ``pipe._current_timestep`` holds that row, and the
transformer receives ``(B, F)`` with ``enable_diffusion_forcing=True``; each frame keeps its own deep copy of
the scheduler. Inside the model tokens are frame-major (``flatten(2)`` of ``(B, C, F, h, w)``), so token
``n`` gets frame ``n // (h·w)``'s timestep: the per-frame mask repeats over each frame's tokens.
"""

from . import ModelFamily, conventions
from .wan import FAMILY as _WAN

FAMILY = ModelFamily(
    name="skyreels-v2",
    denoisers=("SkyReelsV2Transformer3DModel",),
    timestep_arg="timestep",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("transformer",),
    pipelines=("SkyReelsV2Pipeline", "SkyReelsV2ImageToVideoPipeline", "SkyReelsV2DiffusionForcingPipeline",
               "SkyReelsV2DiffusionForcingImageToVideoPipeline", "SkyReelsV2DiffusionForcingVideoToVideoPipeline"),
    default_targets=_WAN.default_targets,
    token_layers=_WAN.token_layers,  # the Wan architecture's module names
    frame_tokens=True,
    video=True,
)
