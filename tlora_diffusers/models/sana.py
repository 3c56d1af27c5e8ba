"""Sana (``SanaTransformer2DModel``): the convention depends on the pipeline, so it is inferred per pipeline.

``SanaPipeline`` passes ``t * transformer.config.timestep_scale`` (1.0 in the released models). The loop computes ``timestep = t.expand(latent_model_input.shape[0])`` then
``timestep = timestep * self.transformer.config.timestep_scale`` (diffusers 0.42.1
``pipelines/sana/pipeline_sana.py:913-914``, passed at line 921): ``(B,)``, ``(2B,)`` under
CFG (one batched call). The pipeline does not set ``_current_timestep``. Sana's
feed-forward (``GLUMBConv``) is convolutions only, so the default targets are the Linear
layers of its self- (linear) and cross-attention.

``SanaSprintPipeline`` / ``SanaSprintImg2ImgPipeline`` sample with ``SCMScheduler``, whose timesteps
are TrigFlow angles ``θ`` in ``[0, π/2]``; they pass the flow time ``sin θ / (sin θ + cos θ)`` (no
``timestep_scale``), and the loop clock turns ``θ`` into the training timestep ``T·sin θ / (sin θ + cos θ)``
(:mod:`tlora_diffusers.runtime.clock`), so the check is exact in those units at any strength.
``SanaControlNetPipeline`` passes ``t`` to both the transformer and the ControlNet.
"""

from . import ModelFamily

FAMILY = ModelFamily(
    name="sana",
    denoisers=("SanaTransformer2DModel",),
    timestep_arg="timestep",
    convention=None,  # per pipeline: t * timestep_scale, the flow time of Sprint's angles, t (ControlNet)
    pipeline_attrs=("transformer", "controlnet"),
    pipelines=("SanaPipeline", "SanaSprintPipeline", "SanaSprintImg2ImgPipeline", "SanaControlNetPipeline"),
    default_targets=("to_q", "to_k", "to_v", "to_out.0"),
)
