"""PixArt-α and PixArt-Σ: both pipelines pass scheduler units unchanged.

Each loop takes ``current_timestep = t``, adds a batch axis to a 0-d tensor and expands it:
``current_timestep.expand(latent_model_input.shape[0])`` (diffusers 0.42.1
``pipelines/pixart_alpha/pipeline_pixart_alpha.py:917-929``, passed at line 936;
``pipeline_pixart_sigma.py:844-858``, line 865): ``(2B,)`` under CFG (one batched call), in
the scheduler's dtype (int64 for the stock DPM-Solver). Neither sets ``_current_timestep``.
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="pixart",
    denoisers=("PixArtTransformer2DModel",),
    timestep_arg="timestep",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("transformer",),
    pipelines=("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
    default_targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
)
