"""Every tiny stock pipeline (classic and modular, one or more per denoiser class with a LoRA loader), under
TLoRAPatch(pipe, cfg): outputs equal an independent reference, and the ranks follow the formula at the timesteps
the pipeline's own loop passes to scheduler.step. The refused ones raise their reason."""

import warnings

import pytest
import torch
from conftest import ReferenceMasks, lora_carriers, loop_timestep, reference_rank
from peft import LoraConfig, inject_adapter_in_model

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from tlora_diffusers.models import ModelFamily, conventions, describe, model_families, register_model_family
from tlora_diffusers.testing import tiny_cases

CASES = tiny_cases()
CFG = TLoRAConfig(8, 1, 1.0)
#: Cases whose denoiser class a T-LoRA is refused on (tlora_diffusers.models.support.REFUSED_DENOISERS).
REFUSED = {"minimax-h3": "MiniMax-H3 packs text, video and audio rows", "rfd4-proteina": "two independent diffusion times"}
MASKED = sorted(set(CASES) - set(REFUSED))


def add_lora(denoiser, targets, seed):
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    if hasattr(denoiser, "add_adapter"):
        denoiser.add_adapter(config)
    else:  # PixArt's transformer has no PEFT mixin; PEFT injects into any module
        inject_adapter_in_model(config, denoiser)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)


def build(case, seed=0):
    pipe = case.build(seed)
    for i, attr in enumerate(case.denoiser_attrs):
        add_lora(getattr(pipe, attr), case.lora_targets, seed + i)
    return pipe


def output(result):
    if isinstance(result, torch.Tensor):  # a modular pipeline called with output="..."
        return result
    images = result.images if hasattr(result, "images") else result.frames if hasattr(result, "frames") else result[0]
    return torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images


@pytest.mark.parametrize("name", MASKED)
@torch.no_grad()
def test_every_stock_pipeline_equals_the_reference(name):
    case = CASES[name]
    pipe = build(case)
    info = describe(getattr(pipe, case.denoiser_attrs[0]))
    ref = ReferenceMasks(pipe, {"default": (8, 1, 1.0, 1)}, lora_carriers(pipe), per_token=case.per_token,
                         timestep_arg=info.timestep_arg, token_layer=info.token_layers,
                         layer_timesteps=info.layer_timesteps,
                         T=getattr(info.family, "num_train_timesteps", None), fixed_calls=case.fixed_calls)
    ref.record(lambda: pipe(**case.inputs(pipe, 0)))
    with ref:
        expected = output(pipe(**case.inputs(pipe, 0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the video families warn (experimental); tested below
        patch = TLoRAPatch(pipe, CFG)
    with patch:
        assert set(case.denoiser_attrs) <= set(patch.denoisers)  # (Z-Image's ControlNet shares the LoRA layers)
        got = output(pipe(**case.inputs(pipe, 0)))
    # Bit-exact for most families; CPU GEMM kernels choose their path by the alignment of the
    # activations, which the extra buffers of a patch can shift (1 ulp, seen on Mochi). A wrong rank
    # at any call moves outputs by more than 1e-3.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert ref.times and len(ref.recorded) == len(ref.times)


@pytest.mark.parametrize("name", ["lumina2", "mochi", "z-image"])
@torch.no_grad()
def test_reversed_conventions_give_few_ranks_at_high_noise(name):
    case = CASES[name]
    pipe = build(case)
    applied = []
    den = getattr(pipe, case.denoiser_attrs[0])
    lora_a = next(m for n, m in den.named_modules() if n.endswith("lora_A.default"))
    hook = lora_a.register_forward_hook(lambda m, a, out: applied.append(int((out.abs().reshape(-1, out.shape[-1])
                                                                             .amax(0) > 0).sum())))
    times = []
    den.register_forward_pre_hook(lambda m, a, k: times.append(loop_timestep(pipe)), with_kwargs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with TLoRAPatch(pipe, CFG):
            pipe(**{**case.inputs(pipe, 0), "num_inference_steps": 4})
    hook.remove()
    assert times[0] > 900 and applied[0] == reference_rank(times[0], 8, 1, 1.0) <= 2
    assert applied == [reference_rank(t, 8, 1, 1.0) for t in times]


@pytest.mark.parametrize("name", sorted(n for n in MASKED if len(CASES[n].denoiser_attrs) > 1))
@torch.no_grad()
def test_the_lora_on_every_denoiser_of_a_case_reaches_the_output(name):
    """Otherwise the reference comparison could not see a wrong mask there (zero-initialised ControlNet outputs)."""
    case = CASES[name]
    pipe = build(case)
    full = output(pipe(**case.inputs(pipe, 0)))
    from peft.tuners.tuners_utils import BaseTunerLayer

    for attr in case.denoiser_attrs:
        layers = [m for m in getattr(pipe, attr).modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        without = output(pipe(**case.inputs(pipe, 0)))
        for layer in layers:
            layer.enable_adapters(True)
        assert (full.float() - without.float()).abs().max() > 1e-4, f"the LoRA on pipe.{attr} does not change the output"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_denoisers_are_refused_at_patch_time_with_their_reason(name):
    case = CASES[name]
    pipe = build(case)
    with pytest.raises(TypeError, match=rf"a T-LoRA cannot be masked on \w+: .*{REFUSED[name]}"):
        TLoRAPatch(pipe, CFG)
    assert type(pipe).__name__ == case.pipeline  # nothing was patched


def test_every_family_is_covered_by_a_tiny_case():
    covered = {c.family for c in CASES.values()}
    assert set(model_families()) - {"tiny-test"} <= covered


@torch.no_grad()
def test_a_wrong_convention_is_an_error_not_a_clamp():
    case = CASES["lumina2"]
    pipe = build(case)
    good = model_families()["lumina2"]
    wrong = ModelFamily(**{**{f: getattr(good, f) for f in ("name", "denoisers", "timestep_arg", "pipeline_attrs")},
                           "convention": conventions.FRACTION})  # the "scale=1000" a user might register
    register_model_family(wrong, replace=True)
    try:
        with pytest.raises(ValueError, match=r"converts to t=0, but that is not the loop's t=1000: .*It fits '1 - t / T .*register_model_family"):
            with TLoRAPatch(pipe, CFG):
                pipe(**case.inputs(pipe, 0))
    finally:
        register_model_family(good, replace=True)


def test_registering_a_known_name_or_class_needs_replace():
    flux = model_families()["flux"]
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        register_model_family(flux)
    with pytest.raises(ValueError, match="FluxTransformer2DModel already belongs to the registered model family 'flux'"):
        register_model_family(ModelFamily("my-flux", ("FluxTransformer2DModel",)))


@pytest.mark.parametrize("cls, arg", [("HiDreamImageTransformer2DModel", "timesteps"), ("ZImageTransformer2DModel", "t"),
                                      ("FluxTransformer2DModel", "timestep")])
def test_unknown_model_error_suggests_its_own_timestep_argument(cls, arg):
    import diffusers

    unknown = type("MyDiT", (torch.nn.Module,), {"forward": getattr(diffusers, cls).forward})()
    with pytest.raises(TypeError, match=rf"no T-LoRA model family knows MyDiT.*timestep_arg={arg!r}"):
        TLoRAPatch(unknown, CFG)


def test_edm_scheduler_is_refused():
    from diffusers import EDMEulerScheduler

    case = CASES["sdxl"]
    pipe = build(case)
    pipe.scheduler = EDMEulerScheduler()
    with pytest.raises(ValueError, match=r"EDMEulerScheduler.*c_noise = 0.25·log σ.*EulerDiscreteScheduler"):
        TLoRAPatch(pipe, CFG)


def test_video_families_warn_that_masks_are_experimental():
    case = CASES["wan"]
    pipe = build(case)
    with pytest.warns(UserWarning, match="wan: T-LoRA masks on temporally compressed video latents are experimental"):
        TLoRAPatch(pipe, CFG).remove()


@torch.no_grad()
@pytest.mark.parametrize("how", ["load_lora_weights", "load_tlora"])
def test_wan22_a14b_masks_both_experts_each_by_the_file_loaded_into_it(tmp_path, how):
    from peft import get_peft_model_state_dict

    from tlora_diffusers import load_tlora
    from tlora_diffusers.io import TLoRAFileMetadata, save_tlora

    case = CASES["wan2.2-a14b"]
    high, low = TLoRAConfig(8, 1, 1.0), TLoRAConfig(8, 4, 2.0)
    files = {}
    for name, cfg, seed in (("high", high, 1), ("low", low, 2)):
        donor = case.build(seed)
        add_lora(donor.transformer, case.lora_targets, seed)
        files[name] = save_tlora(tmp_path / name, get_peft_model_state_dict(donor.transformer), TLoRAFileMetadata(
            cfg, component="transformer"), donor.transformer.peft_config["default"].to_dict())
    pipe = case.build(0)
    if how == "load_lora_weights":
        pipe.load_lora_weights(str(files["high"]), adapter_name="high")
        pipe.load_lora_weights(str(files["low"]), adapter_name="low", load_into_transformer_2=True)
    else:
        load_tlora(pipe, files["high"], adapter_name="high")
        load_tlora(pipe, files["low"], adapter_name="low", component="transformer_2")
    ref_cfg = {"high": (8, 1, 1.0, 1), "low": (8, 4, 2.0, 1)}
    ref = ReferenceMasks(pipe, ref_cfg, ["transformer", "transformer_2"])
    ref.record(lambda: pipe(**case.inputs(pipe, 0)))
    with ref:
        expected = output(pipe(**case.inputs(pipe, 0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch = TLoRAPatch(pipe)  # one patch, each expert with the config of its own file
    with patch:
        assert patch.configs == {"high": high, "low": low}
        assert sorted(patch.denoisers) == ["transformer", "transformer_2"]
        got = output(pipe(**case.inputs(pipe, 0)))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert len(ref.times) >= 4
