"""Stock diffusers pipelines, unmodified, with TLoRAPatch: the rank applied at every denoiser call."""

import pytest
import torch
from conftest import add_lora, reference_rank

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from tlora_diffusers.tiny import KINDS, tiny_pipeline, tiny_prompt_embeds

#: Denoiser calls per sampling step: Flux2 Klein runs CFG as a second call; SDXL/SD3 double the batch.
CALLS_PER_STEP = {"sdxl": 1, "flux": 1, "flux2-klein": 2, "flux2": 1, "sd3": 1, "sd": 1}
#: What the pipeline passes as `timestep`, in scheduler units (FACTS.md).
MODEL_SCALE = {"sdxl": 1, "flux": 1000, "flux2-klein": 1000, "flux2": 1000, "sd3": 1, "sd": 1}


def denoiser_of(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def run(pipe, steps=4, seed=0, **kw):
    return pipe(**tiny_prompt_embeds(pipe), num_inference_steps=steps, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kw).images


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", [TLoRAConfig(8, 1, 1.0), TLoRAConfig(8, 3, 2.5)], ids=str)
@torch.no_grad()
def test_rank_per_call_follows_the_schedule(kind, cfg):
    pipe = tiny_pipeline(kind)
    denoiser = denoiser_of(pipe)
    add_lora(denoiser, kind)
    # Independent observation: the timestep the pipeline passes, and how many rank channels of one
    # LoRA down-projection are non-zero after masking.
    timesteps, ranks = [], []
    pre = denoiser.register_forward_pre_hook(
        lambda m, a, k: timesteps.append(k["timestep"] if "timestep" in k else a[1]), with_kwargs=True)
    patch = TLoRAPatch(pipe, cfg)
    lora_a = next(m for n, m in denoiser.named_modules() if n.endswith("lora_A.default"))
    rank_dim = -1 if isinstance(lora_a, torch.nn.Linear) else 1
    spy = lora_a.register_forward_hook(
        lambda m, a, out: ranks.append(int(out.movedim(rank_dim, -1).reshape(-1, 8).abs().amax(0).gt(0).sum())))
    run(pipe, steps=4)
    spy.remove(), pre.remove(), patch.remove()

    scheduler_t = pipe.scheduler.timesteps.tolist()
    assert len(scheduler_t) == 4
    expected = [reference_rank(t, 8, cfg.min_rank, cfg.alpha) for t in scheduler_t for _ in range(CALLS_PER_STEP[kind])]
    assert ranks == expected
    # The pipeline's own convention, checked against the scheduler (not against our adapter).
    passed = [float(torch.as_tensor(t).reshape(-1)[0]) for t in timesteps]
    expected_passed = [t / MODEL_SCALE[kind] for t in scheduler_t for _ in range(CALLS_PER_STEP[kind])]
    assert passed == pytest.approx(expected_passed, rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_full_rank_identical_and_remove_restores(kind):
    pipe = tiny_pipeline(kind)
    add_lora(denoiser_of(pipe), kind)
    plain = run(pipe)
    with TLoRAPatch(pipe, TLoRAConfig(8, 8)):
        assert (run(pipe) == plain).all()
    with TLoRAPatch(pipe, TLoRAConfig(8, 1)):
        masked = run(pipe)
    assert not (masked == plain).all()
    assert (run(pipe) == plain).all()


@torch.no_grad()
def test_flux_true_cfg_separate_calls():
    pipe = tiny_pipeline("flux")
    add_lora(pipe.transformer, "flux")
    kw = tiny_prompt_embeds(pipe)
    neg = {"negative_prompt_embeds": kw["prompt_embeds"] * 0.5, "negative_pooled_prompt_embeds": kw["pooled_prompt_embeds"] * 0.5}
    ranks = []
    lora_a = next(m for n, m in pipe.transformer.named_modules() if n.endswith("lora_A.default"))
    with TLoRAPatch(pipe, TLoRAConfig(8, 1)):
        h = lora_a.register_forward_hook(lambda m, a, o: ranks.append(int(o.reshape(-1, 8).abs().amax(0).gt(0).sum())))
        pipe(**kw, **neg, true_cfg_scale=4.0, num_inference_steps=3, height=64, width=64, output_type="latent")
        h.remove()
    assert ranks == [reference_rank(t, 8, 1, 1.0) for t in pipe.scheduler.timesteps.tolist() for _ in range(2)]
