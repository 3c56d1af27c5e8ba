"""Sana: ``SanaPipeline`` passes ``t * transformer.config.timestep_scale`` (1.0 in the released models).

The loop computes ``timestep = t.expand(latent_model_input.shape[0])`` then
``timestep = timestep * self.transformer.config.timestep_scale`` (diffusers 0.42.1
``pipelines/sana/pipeline_sana.py:913-914``, passed at line 921): ``(B,)``, ``(2B,)`` under
CFG (one batched call). The pipeline does not set ``_current_timestep``. Sana's
feed-forward (``GLUMBConv``) is convolutions only, so the default targets are the Linear
layers of its self- (linear) and cross-attention.
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="sana",
    denoisers=("SanaTransformer2DModel",),
    timestep_arg="timestep",
    convention=conventions.ConfigScaled(field="timestep_scale"),
    pipeline_attrs=("transformer",),
    pipelines=("SanaPipeline",),
    default_targets=("to_q", "to_k", "to_v", "to_out.0"),
)
