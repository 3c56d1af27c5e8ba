"""HiDream-I1: ``HiDreamImagePipeline`` passes scheduler units unchanged, as ``timesteps``.

The loop passes ``timesteps=t.expand(latent_model_input.shape[0])`` (diffusers 0.42.1
``pipelines/hidream_image/pipeline_hidream_image.py:931,935``): a ``(B,)`` tensor, ``(2B,)``
under CFG, which batches the negative and conditional halves into one call. The keyword is
``timesteps``, not ``timestep``. The pipeline does not set ``_current_timestep``. The image
stream's feed-forward is a mixture of experts; ``w1``/``w2``/``w3`` select the shared and
every routed expert as well as the text stream's feed-forward.
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="hidream",
    denoisers=("HiDreamImageTransformer2DModel",),
    timestep_arg="timesteps",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("transformer",),
    pipelines=("HiDreamImagePipeline",),
    default_targets=(
        "to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t", "w1", "w2", "w3",
    ),
)
