"""The per-call runtime of a patch, readable in one sitting.

* :mod:`.clock` — the pipeline loop's own timestep (``pipe.current_timestep``, a modular
  pipeline's guider, ``scheduler.timesteps[step_index]``) and the schedulers refused;
* :mod:`.timesteps` — one call's timesteps in scheduler units: the convention (declared or
  inferred), verified against the loop at every call, snapped to its exact value;
* :mod:`.attachment` — the two hooks on a denoiser, whose call it is (a patched run, an
  unpatched ``from_pipe`` sibling, a bare call), the masks and the slot they fill;
* :mod:`.slot` — what masked layers read during a call (weights or outputs mode);
* :mod:`.layer` — the one object a masked layer carries;
* :mod:`.checkpointing` — gradient checkpointing that recomputes with the call's mask.
"""
