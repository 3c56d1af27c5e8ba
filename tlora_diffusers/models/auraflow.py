"""AuraFlow: ``AuraFlowPipeline`` passes ``t / 1000``.

The loop builds ``timestep = torch.tensor([t / 1000]).expand(latent_model_input.shape[0])``
and casts it to the latents' dtype (diffusers 0.42.1
``pipelines/aura_flow/pipeline_aura_flow.py:622-623``, passed at line 629): ``(2B,)`` under
CFG (one batched call). The pipeline does not set ``_current_timestep``.
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="auraflow",
    denoisers=("AuraFlowTransformer2DModel",),
    timestep_arg="timestep",
    convention=conventions.FRACTION,
    pipeline_attrs=("transformer",),
    pipelines=("AuraFlowPipeline",),
    default_targets=(
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "ff.linear_1", "ff.linear_2", "ff.out_projection",
        "ff_context.linear_1", "ff_context.linear_2", "ff_context.out_projection",
    ),
)
