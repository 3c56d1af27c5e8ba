"""The loop's timestep is the truth: exact ranks in bf16, verified calls, no stale or silent patch.

Reference ranks are the paper's formula (conftest.reference_rank) at the timesteps the loop passes to
``scheduler.step`` (conftest.StepRecorder), never read through tlora_diffusers.
"""

import math
import warnings

import pytest
import torch
from conftest import ReferenceMasks, StepRecorder, lora_carriers, reference_rank
from test_families import CASES, add_lora, build, output

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from tlora_diffusers.models.conventions import FRACTION
from tlora_diffusers.runtime.timesteps import ConventionGuess, resolve

RANK = 64


def _ranks_applied(denoiser):
    """Active ranks of one LoRA layer at each call: non-zero columns of its lora_A output."""
    lora_a = next(m for n, m in denoiser.named_modules() if n.endswith("lora_A.default"))
    seen = []
    handle = lora_a.register_forward_hook(
        lambda m, a, out: seen.append(int((out.detach().float().abs().reshape(-1, out.shape[-1]).amax(0) > 0).sum())))
    return seen, handle


def _lora64(denoiser, targets):
    from peft import LoraConfig

    torch.manual_seed(0)
    denoiser.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(targets), init_lora_weights=False))
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p).abs() + 0.1)  # no column can vanish by chance


def _shifted(scheduler, mu):
    """The same scheduler with the dynamic shift of a full-size image fixed (exp(mu): the identical sigmas)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(scheduler.config, use_dynamic_shifting=False, shift=math.exp(mu))
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def _calculate_shift(seq, base_seq, max_seq, base_shift, max_shift):
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return seq * m + base_shift - m * base_seq


# Full-size schedules: FLUX.1-dev 1024² (4096 image tokens), Qwen-Image 1328² (83² tokens), HunyuanVideo (shift 7).
SCHEDULES = {
    "flux-28": ("flux", 28, _calculate_shift(4096, 256, 4096, 0.5, 1.15)),
    "flux-50": ("flux", 50, _calculate_shift(4096, 256, 4096, 0.5, 1.15)),
    "qwen-image-50": ("qwen-image", 50, _calculate_shift(83 * 83, 256, 8192, 0.5, 0.9)),
    "hunyuan-video-50": ("hunyuan-video", 50, None),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@torch.no_grad()
def test_bf16_runs_apply_exactly_the_ranks_of_the_loop_timesteps(name):
    """These pipelines cast the timestep to bf16 before the call; the ranks still follow the exact loop t."""
    case_name, steps, mu = SCHEDULES[name]
    case = CASES[case_name]
    pipe = case.build(0)
    if mu is not None:
        pipe.scheduler = _shifted(pipe.scheduler, mu)
    _lora64(pipe.transformer, case.lora_targets)
    pipe.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in dict(case.inputs(pipe, 0), num_inference_steps=steps).items()}
    raw_ranks = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: raw_ranks.append(reference_rank(
        float(torch.as_tensor(kw["timestep"]).reshape(-1)[0].float()) * (1000 if case_name != "hunyuan-video" else 1),
        RANK, 1, 1.0)), with_kwargs=True)
    with StepRecorder(pipe, ["transformer"]) as rec:
        pipe(**inputs)
    hook.remove()
    loop_t = rec.call_timesteps()
    expected = [reference_rank(t, RANK, 1, 1.0) for t in loop_t]
    # The bf16 argument itself would be a rank off at some calls: what this test guards against.
    assert sum(a != b for a, b in zip(raw_ranks, expected)) >= 1
    seen, handle = _ranks_applied(pipe.transformer)
    with TLoRAPatch(pipe, TLoRAConfig(RANK, 1, 1.0)):
        pipe(**inputs)
    handle.remove()
    assert seen == expected


@pytest.mark.parametrize("steps, strength", [(4, 0.25), (8, 0.15), (20, 0.1)])
@torch.no_grad()
def test_sana_sprint_img2img_at_low_strength_is_exact(steps, strength):
    """SCM angle timesteps, converted to training timesteps exactly: no tolerance lets a wrong convention through."""
    case = CASES["sana-sprint-img2img"]
    pipe = build(case)
    def inputs():  # fresh each run: the generator inside is consumed by a run
        return dict(case.inputs(pipe, 0), num_inference_steps=steps, strength=strength)

    ref = ReferenceMasks(pipe, {"default": (8, 1, 1.0, 1)}, lora_carriers(pipe))
    ref.record(lambda: pipe(**inputs()))
    with ref:
        expected = output(pipe(**inputs()))
    with TLoRAPatch(pipe, TLoRAConfig(8, 1, 1.0)) as patch:
        got = output(pipe(**inputs()))
        assert patch.conventions == {"pipe.transformer": "t / T"}
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert max(ref.times) < 0.4 * 1000  # low strength: every step at low noise, where a loose check fails


def test_a_per_sample_call_after_uniform_ones_in_the_same_run_is_masked_per_sample():
    guess = ConventionGuess("x", "timestep", FRACTION)
    module, loop = torch.nn.Linear(1, 1), (torch.tensor(600.0), None)
    uniform = resolve(torch.tensor([0.6, 0.6]), guess, module, 1000, "x", loop, None)
    assert uniform.uniform and float(uniform.t) == 600.0
    mixed = resolve(torch.tensor([0.6, 0.3]), guess, module, 1000, "x", loop, None)
    assert not mixed.uniform and mixed.t.tolist() == [600.0, 300.0]


@torch.no_grad()
def test_an_unpatched_from_pipe_sibling_is_verified_against_its_own_loop():
    from diffusers import FluxImg2ImgPipeline

    case = CASES["flux"]
    pipe = build(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sibling = FluxImg2ImgPipeline.from_pipe(pipe)
    img2img = CASES["flux-img2img"]
    ref = ReferenceMasks(sibling, {"default": (8, 1, 1.0, 1)}, ["transformer"])
    ref.record(lambda: sibling(**img2img.inputs(sibling, 0)))
    with ref:
        expected = output(sibling(**img2img.inputs(sibling, 0)))
    with TLoRAPatch(pipe, TLoRAConfig(8, 1, 1.0)):
        got = output(sibling(**img2img.inputs(sibling, 0)))  # not patched itself: checked against its own loop
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_an_unpatched_sibling_with_an_edm_scheduler_is_refused_and_patching_it_as_told_works():
    from diffusers import EDMEulerScheduler, StableDiffusionXLImg2ImgPipeline

    pipe = build(CASES["sdxl"])
    sibling = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe, scheduler=EDMEulerScheduler())
    inputs = CASES["sdxl-img2img"].inputs(sibling, 0)
    with TLoRAPatch(pipe, TLoRAConfig(8, 1, 1.0)):
        with pytest.raises(ValueError, match="EDMEulerScheduler.*EulerDiscreteScheduler.from_config"):
            sibling(**inputs)


@torch.no_grad()
def test_an_unpatched_sibling_of_an_inferred_class_before_any_run_says_to_patch_it_and_that_works():
    case = CASES["krea2"]  # no family file: the convention is inferred from a run
    pipe = build(case)
    sibling = type(pipe).from_pipe(pipe)
    patch = TLoRAPatch(pipe, TLoRAConfig(8, 1, 1.0))
    with pytest.raises(RuntimeError, match=r"is not patched itself.*patch this Krea2Pipeline too"):
        sibling(**case.inputs(sibling, 0))
    patch.remove()
    ref = ReferenceMasks(sibling, {"default": (8, 1, 1.0, 1)}, ["transformer"])
    ref.record(lambda: sibling(**case.inputs(sibling, 0)))
    with ref:
        expected = output(sibling(**case.inputs(sibling, 0)))
    with TLoRAPatch(pipe, TLoRAConfig(8, 1, 1.0)), TLoRAPatch(sibling, TLoRAConfig(8, 1, 1.0)):
        got = output(sibling(**case.inputs(sibling, 0)))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_replaced_denoiser_is_an_error_at_the_next_run():
    case = CASES["flux"]
    pipe = build(case)
    other = case.build(1).transformer
    add_lora(other, case.lora_targets, 1)
    with TLoRAPatch(pipe, TLoRAConfig(8, 1, 1.0)):
        pipe.transformer = other
        with pytest.raises(RuntimeError, match=r"pipe.transformer was replaced since patching.*patch the pipeline again"):
            pipe(**case.inputs(pipe, 0))


@torch.no_grad()
def test_a_component_with_lora_set_after_patching_is_an_error():
    case = CASES["flux-controlnet"]
    pipe = build(case)
    controlnet = pipe.controlnet
    pipe.controlnet = None
    patch = TLoRAPatch(pipe, TLoRAConfig(8, 1, 1.0))
    pipe.controlnet = controlnet
    with pytest.raises(RuntimeError, match=r"pipe.controlnet .* was set since patching and carries LoRA layers"):
        pipe(**case.inputs(pipe, 0))
    patch.remove()


def test_target_parameters_loras_are_refused_at_patch_time():
    from peft import LoraConfig

    case = CASES["flux"]
    pipe = case.build(0)
    pipe.transformer.add_adapter(LoraConfig(r=4, target_modules=[], target_parameters=["transformer_blocks.0.attn.to_q.weight"]))
    with pytest.raises(ValueError, match=r"target_parameters.*no rank bottleneck.*target_modules"):
        TLoRAPatch(pipe, TLoRAConfig(4))


def test_continuous_euler_is_refused_with_a_fix_that_works():
    from diffusers import EulerDiscreteScheduler

    case = CASES["sdxl"]
    pipe = build(case)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_type="continuous",
                                                        prediction_type="v_prediction")
    with pytest.raises(ValueError, match=r"timestep_type='continuous'.*0.25·log σ.*timestep_type='discrete'"):
        TLoRAPatch(pipe, TLoRAConfig(8, 1, 1.0))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_type="discrete")
    with TLoRAPatch(pipe, TLoRAConfig(8, 1, 1.0)):
        pipe(**case.inputs(pipe, 0))


def test_the_latent_upscaler_is_refused_with_its_reason():
    from diffusers import StableDiffusionLatentUpscalePipeline

    from tlora_diffusers.runtime.clock import pipeline_refusal

    upscaler = object.__new__(StableDiffusionLatentUpscalePipeline)
    assert "0.25·log σ by design" in pipeline_refusal(upscaler)
