"""Würstchen prior (``WuerstchenPrior``): its timestep is the ratio ``r`` in [0, 1] (1 = pure noise).

``WuerstchenPriorPipeline`` (diffusers 0.42.1, ``pipelines/wuerstchen/pipeline_wuerstchen_prior.py``)
loops over ``t`` in ``DDPMWuerstchenScheduler.timesteps`` (``linspace(1, 0, n + 1)[:-1]``) and calls
``prior(x, r=t.expand(2B), c=...)``, cast to the prompt embeddings' dtype. The scheduler has no
``num_train_timesteps`` and no ``step_index``: ``T = 1`` and each call is matched to the nearest entry of
its timesteps.
"""

from . import ModelFamily, conventions

FAMILY = ModelFamily(
    name="wuerstchen",
    denoisers=("WuerstchenPrior",),
    timestep_arg="r",
    convention=conventions.SCHEDULER_UNITS,
    pipeline_attrs=("prior",),
    pipelines=("WuerstchenPriorPipeline",),
    default_targets=("to_q", "to_k", "to_v", "to_out.0"),
    num_train_timesteps=1,
)
