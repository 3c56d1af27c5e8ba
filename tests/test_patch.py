"""TLoRAPatch on tiny denoisers, against independent references."""

import copy

import pytest
import torch
from conftest import add_lora, reference_rank, run_concurrently, state_hash, unet_inputs
from peft import LoraConfig

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from tlora_diffusers.runtime.attachment import attachment_of
from tlora_diffusers.tiny import tiny_pipeline, tiny_prompt_embeds




@pytest.fixture
def unet():
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl", rank=8)
    return pipe.unet




def current_mode(denoiser):
    """What the denoiser's masked layers would apply right now (None: nothing)."""
    attachment = attachment_of(denoiser)
    return None if attachment is None else attachment.slot.mode


def truncated_copy(model: torch.nn.Module, rank: int, adapter: str = "default") -> torch.nn.Module:
    """Independent reference: a copy whose LoRA down-projections keep only their first `rank` rows."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if f"lora_A.{adapter}." in name:
                p[rank:] = 0
    return ref


@torch.no_grad()
@pytest.mark.parametrize("t", [0, 1, 250, 499.5, 750, 999, 1000])
def test_masked_unet_equals_truncated_lora(unet, t):
    cfg = TLoRAConfig(8, 1, 1.0)
    x = unet_inputs(unet)
    expected = truncated_copy(unet, reference_rank(t, 8, 1, 1.0))(timestep=t, **x).sample
    with TLoRAPatch(unet, cfg):
        got = unet(timestep=t, **x).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@torch.no_grad()
def test_memoised_masks_of_revisited_timesteps_equal_the_reference_and_stay_bounded(unet, monkeypatch):
    """Masks of a shared timestep are memoised by value (a run's timesteps recur image after image): a revisited
    timestep, after others, still gives the truncated LoRA's output, and the memo does not grow without bound."""
    import tlora_diffusers.runtime.attachment as attach

    cfg = TLoRAConfig(8, 1, 1.0)
    x = unet_inputs(unet)
    expected = {t: truncated_copy(unet, reference_rank(t, 8, 1, 1.0))(timestep=t, **x).sample for t in (999, 0, 500)}
    monkeypatch.setattr(attach, "_MASK_CACHE_SIZE", 4)
    with TLoRAPatch(unet, cfg):
        for t in (999, 0, 500, 999, 0, 500):
            torch.testing.assert_close(unet(timestep=torch.tensor(float(t)), **x).sample, expected[t], rtol=0, atol=0)
        for t in range(10, 20):
            unet(timestep=torch.tensor(float(t)), **x)
        binding = attachment_of(unet).bindings[0]
        assert len(binding._shared_masks) == 4
        torch.testing.assert_close(unet(timestep=999, **x).sample, expected[999], rtol=0, atol=0)


@torch.no_grad()
def test_masked_flux_equals_truncated_lora():
    pipe = tiny_pipeline("flux")
    add_lora(pipe.transformer, "flux", rank=8)
    out = {}

    def capture(module, args, kwargs):
        out.update(kwargs)

    h = pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    pipe(**tiny_prompt_embeds(pipe), num_inference_steps=1, height=64, width=64, output_type="latent")
    h.remove()
    cfg = TLoRAConfig(8, 2, 2.0)
    for t in (0.9, 0.5, 0.05):
        kw = dict(out, timestep=torch.tensor([t]))
        expected = truncated_copy(pipe.transformer, reference_rank(t * 1000, 8, 2, 2.0))(**kw)[0]
        with TLoRAPatch(pipe.transformer, cfg):
            got = pipe.transformer(**kw)[0]
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@torch.no_grad()
def test_per_sample_timesteps_equal_one_by_one(unet):
    x = unet_inputs(unet, batch=3)
    t = torch.tensor([10.0, 500.0, 990.0])
    with TLoRAPatch(unet, TLoRAConfig(8, 1)):
        batched = unet(timestep=t, **x).sample
        for i in range(3):
            xi = {"sample": x["sample"][i:i + 1], "encoder_hidden_states": x["encoder_hidden_states"][i:i + 1],
                  "added_cond_kwargs": {k: v[i:i + 1] for k, v in x["added_cond_kwargs"].items()}}
            single = unet(timestep=t[i:i + 1], **xi).sample
            other = unet(timestep=t[(i + 1) % 3:(i + 1) % 3 + 1], **xi).sample
            torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-4, atol=2e-4)
            assert (batched[i:i + 1] - other).abs().max() > 100 * 2e-4  # a wrong mask would be caught


@torch.no_grad()
def test_full_rank_is_identical_and_remove_restores(unet):
    x = unet_inputs(unet)
    before = unet(timestep=600, **x).sample
    with TLoRAPatch(unet, TLoRAConfig(8, 8)):
        assert torch.equal(unet(timestep=600, **x).sample, before)
    patch = TLoRAPatch(unet, TLoRAConfig(8, 1))
    assert not torch.equal(unet(timestep=600, **x).sample, before)
    patch.remove()
    patch.remove()  # idempotent
    assert torch.equal(unet(timestep=600, **x).sample, before)


@torch.no_grad()
def test_exception_inside_denoiser_leaves_no_mask_active(unet):
    x = unet_inputs(unet)
    patch = TLoRAPatch(unet, TLoRAConfig(8, 1))
    seen = []

    def boom(module, args):
        seen.append(current_mode(unet))
        raise RuntimeError("boom")

    h = unet.mid_block.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        unet(timestep=900, **x)
    h.remove()
    assert seen[0] == "weights"  # the mask was active inside the call
    assert current_mode(unet) is None  # and is gone after it raised
    expected = truncated_copy(unet, reference_rank(100, 8, 1, 1.0))(timestep=100, **x).sample
    assert torch.equal(unet(timestep=100, **x).sample, expected)
    patch.remove()


@torch.no_grad()
def test_keyboard_interrupt_inside_pipeline_leaves_no_mask_active():
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl")
    kw = dict(tiny_prompt_embeds(pipe), num_inference_steps=3, height=64, width=64, output_type="np")
    with TLoRAPatch(pipe, TLoRAConfig(8, 1)):
        clean = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        h = pipe.unet.mid_block.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            pipe(**kw)
        h.remove()
        again = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
        assert current_mode(pipe.unet) is None
    assert (clean == again).all()


def _no_hooks_left(module):
    from tlora_diffusers.backends.peft import masked_classes

    return all(not m._forward_hooks and not m._forward_pre_hooks and not isinstance(m, masked_classes())
               and not any(k.startswith("_tlora") for k in vars(m)) for m in module.modules())


def test_lossless_remove_and_cycles():
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl")
    cls, h0, fwd = type(pipe), state_hash(pipe.unet), pipe.unet.forward
    attrs = set(vars(pipe.unet)), set(vars(pipe))
    for _ in range(3):
        patch = TLoRAPatch(pipe, TLoRAConfig(8, 2))
        assert type(pipe) is not cls and isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__
        patch.remove()
    assert type(pipe) is cls
    assert state_hash(pipe.unet) == h0
    assert pipe.unet.forward == fwd and "forward" not in vars(pipe.unet)
    assert _no_hooks_left(pipe.unet)
    assert (set(vars(pipe.unet)), set(vars(pipe))) == attrs


def test_pipeline_patch_via_context_manager_and_repr():
    pipe = tiny_pipeline("flux")
    add_lora(pipe.transformer, "flux")
    with TLoRAPatch(pipe, TLoRAConfig(8, 1, 0.5)) as patch:
        assert "pipe.transformer" in repr(patch) and patch.adapter_names == ["default"]
        assert any("to_q" in n for n in patch.layer_names)
    assert "removed" in repr(patch) and _no_hooks_left(pipe.transformer)


# -- errors -------------------------------------------------------------------------------


def test_error_no_lora_layers():
    pipe = tiny_pipeline("sdxl")
    with pytest.raises(ValueError, match=r"pipe.unet has no LoRA layers to mask: load a LoRA first"):
        TLoRAPatch(pipe, TLoRAConfig(8))


def test_error_fused_lora_refused_and_unchanged():
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl")
    pipe.unet.fuse_lora() if hasattr(pipe.unet, "fuse_lora") else None
    for layer in pipe.unet.modules():
        if hasattr(layer, "merge") and hasattr(layer, "lora_A"):
            layer.merge() if not layer.merged else None
    cls, h0 = type(pipe), state_hash(pipe.unet)
    with pytest.raises(ValueError, match="fused into the base weights.*unfuse_lora"):
        TLoRAPatch(pipe, TLoRAConfig(8))
    assert type(pipe) is cls and state_hash(pipe.unet) == h0 and _no_hooks_left(pipe.unet)


def test_error_fused_after_patching_detected_at_call():
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl")
    patch = TLoRAPatch(pipe, TLoRAConfig(8))
    for layer in pipe.unet.modules():
        if hasattr(layer, "merge") and hasattr(layer, "lora_A"):
            layer.merge()
    with pytest.raises(RuntimeError, match="can no longer mask: .*fused.*unfuse_lora\\(\\) to mask it again"):
        pipe(**tiny_prompt_embeds(pipe), num_inference_steps=1, height=64, width=64)
    patch.remove()


def test_error_dora():
    pipe = tiny_pipeline("sdxl")
    pipe.unet.add_adapter(LoraConfig(r=8, target_modules=["to_q"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA adapters are not supported"):
        TLoRAPatch(pipe, TLoRAConfig(8))


def test_error_rank_mismatch_names_adapter_and_adapter_selection():
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl", rank=8, name="tlora")
    add_lora(pipe.unet, "sdxl", rank=4, name="style", seed=5)
    pipe.unet.set_adapters(["tlora", "style"])
    with pytest.raises(ValueError, match=r"adapter 'style' has rank 4 at .* but its TLoRAConfig max_rank=8"):
        TLoRAPatch(pipe, TLoRAConfig(8))
    with pytest.raises(ValueError, match=r"adapter\(s\) \['nope'\] have no LoRA layers.*\['style', 'tlora'\]"):
        TLoRAPatch(pipe, TLoRAConfig(8), adapter_names=["nope"])
    x = unet_inputs(pipe.unet)
    with torch.no_grad():
        expected = truncated_copy(pipe.unet, reference_rank(700, 8, 1, 1.0), "tlora")(timestep=700, **x).sample
        with TLoRAPatch(pipe, TLoRAConfig(8), adapter_names=["tlora"]) as patch:
            assert patch.adapter_names == ["tlora"]
            torch.testing.assert_close(pipe.unet(timestep=700, **x).sample, expected, rtol=0, atol=0)


def test_error_unknown_denoiser_lists_supported_and_how_to_register():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"no T-LoRA model family knows Sequential and .*Supported families: .*UNet2DConditionModel.*register_model_family"):
        TLoRAPatch(model, TLoRAConfig(4))


def test_error_double_patch():
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl")
    patch = TLoRAPatch(pipe, TLoRAConfig(8))
    with pytest.raises(RuntimeError, match="already T-LoRA patched; call .remove"):
        TLoRAPatch(pipe, TLoRAConfig(8))
    with pytest.raises(RuntimeError, match="already T-LoRA patched"):
        TLoRAPatch(pipe.unet, TLoRAConfig(8))
    patch.remove()
    bare = TLoRAPatch(pipe.unet, TLoRAConfig(8))
    with pytest.raises(RuntimeError, match="already T-LoRA patched"):
        TLoRAPatch(pipe.unet, TLoRAConfig(8))
    with pytest.raises(RuntimeError, match="already T-LoRA patched"):
        TLoRAPatch(pipe, TLoRAConfig(8))
    bare.remove()


@pytest.mark.parametrize(
    "kwargs, exc, fragment",
    [
        (dict(cfg=None), ValueError, "no T-LoRA config was found for adapter(s) ['default']"),
        (dict(cfg={"max_rank": 8}), TypeError, "cfg must be a TLoRAConfig, or a dict of adapter name -> TLoRAConfig"),
        (dict(cfg=TLoRAConfig(8), num_train_timesteps=0), ValueError, "num_train_timesteps must be an int >= 1, got 0"),
    ],
)
def test_error_bad_arguments(unet, kwargs, exc, fragment):
    with pytest.raises(exc) as e:
        TLoRAPatch(unet, **kwargs)
    assert fragment in str(e.value)
    assert _no_hooks_left(unet)


def test_error_pipeline_arguments():
    with pytest.raises(TypeError, match="needs a diffusers pipeline or a denoiser nn.Module; got object"):
        TLoRAPatch(object(), TLoRAConfig(8))
    pipe = tiny_pipeline("flux")
    add_lora(pipe.transformer, "flux")
    with pytest.raises(TypeError, match="num_train_timesteps is read from pipe.scheduler"):
        TLoRAPatch(pipe, TLoRAConfig(8), num_train_timesteps=1000)


@torch.no_grad()
def test_error_missing_timestep_and_bad_timestep(unet):
    x = unet_inputs(unet)
    with TLoRAPatch(unet, TLoRAConfig(8)):
        with pytest.raises(ValueError, match="called without `timestep`"):
            unet(timestep=None, **x)
        with pytest.raises(ValueError, match="must be finite"):
            unet(timestep=torch.tensor(float("nan")), **x)
        assert current_mode(unet) is None


class TinyDenoiser(torch.nn.Module):
    """A user's own denoiser: timestep third, in units of 1/10 scheduler step."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x, cond, t):
        return self.proj(x)


@torch.no_grad()
def test_register_model_family_and_batch_mismatch():
    from peft import inject_adapter_in_model

    from tlora_diffusers.models import ModelFamily, conventions, register_model_family

    model = TinyDenoiser()
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False), model)
    with pytest.raises(TypeError, match=r"no T-LoRA model family knows TinyDenoiser.*timestep_arg='t'"):
        TLoRAPatch(model, TLoRAConfig(4, 0))
    # the error's advice, taken: the model receives t / 10 (a Scaled(10) convention)
    register_model_family(ModelFamily("tiny-test", ("TinyDenoiser",), timestep_arg="t",
                                      convention=conventions.Scaled(10.0)))
    x = torch.randn(2, 3, 4)
    with TLoRAPatch(model, TLoRAConfig(4, 0)):
        full = model(x, None, 0.0)
        lora_a = model.proj.lora_A["default"]
        spy = []
        h = lora_a.register_forward_hook(lambda m, a, o: spy.append(o))
        model(x, None, torch.tensor([50.0, 99.0]))  # scheduler units 500 and 990
        h.remove()
        assert spy[0][0].abs().amax(0).gt(0).sum() == 2 and spy[0][1].abs().amax(0).gt(0).sum() == 0
        assert torch.equal(model(x, None, t=0.0), full)
        with pytest.raises(ValueError, match="received a batch of 2 but the TinyDenoiser call has 3 per-sample"):
            model(x, None, torch.tensor([1.0, 2.0, 3.0]))
        with pytest.raises(ValueError, match=r"converts \(t / 10\) to t=1500, outside \[0, T=1000\]"):
            model(x, None, 150.0)


# -- shared denoisers -----------------------------------------------------------------------


def _rank_spy(denoiser, log):
    name, module = next((n, m) for n, m in denoiser.named_modules() if n.endswith("lora_A.default"))
    dims = -1 if isinstance(module, torch.nn.Linear) else 1

    def spy(m, a, out):
        moved = out.movedim(dims, -1).reshape(-1, out.shape[dims])
        log.append(int((moved.abs().amax(0) > 0).sum()))

    return module.register_forward_hook(spy)


@torch.no_grad()
def test_from_pipe_pipelines_sharing_a_denoiser_use_their_own_configs():
    from diffusers import StableDiffusionXLPipeline

    a = tiny_pipeline("sdxl")
    add_lora(a.unet, "sdxl")
    b = StableDiffusionXLPipeline.from_pipe(a)
    b.scheduler = copy.deepcopy(a.scheduler)
    assert b.unet is a.unet
    pa, pb = TLoRAPatch(a, TLoRAConfig(8, 1, 1.0)), TLoRAPatch(b, TLoRAConfig(8, 4, 3.0))
    kw = dict(tiny_prompt_embeds(a), num_inference_steps=3, height=64, width=64, output_type="np")
    log = []
    h = _rank_spy(a.unet, log)
    a(**kw)
    ta = a.scheduler.timesteps.tolist()
    b(**kw)
    tb = b.scheduler.timesteps.tolist()
    h.remove()
    assert log == [reference_rank(t, 8, 1, 1.0) for t in ta] + [reference_rank(t, 8, 4, 3.0) for t in tb]
    with pytest.raises(RuntimeError, match="carries 2 T-LoRA patches"):
        a.unet(timestep=10, **unet_inputs(a.unet))
    pa.remove()
    pb.remove()
    assert _no_hooks_left(a.unet)


@torch.no_grad()
def test_threads_do_not_share_masks():
    from diffusers import StableDiffusionXLPipeline

    a = tiny_pipeline("sdxl")
    add_lora(a.unet, "sdxl")
    b = StableDiffusionXLPipeline.from_pipe(a)
    b.scheduler = copy.deepcopy(a.scheduler)
    kw = dict(tiny_prompt_embeds(a), num_inference_steps=4, height=64, width=64, output_type="np")
    with TLoRAPatch(a, TLoRAConfig(8, 1, 1.0)), TLoRAPatch(b, TLoRAConfig(8, 6, 0.3)):
        seq = [p(**kw, generator=torch.Generator().manual_seed(0)).images for p in (a, b)]
        results = run_concurrently({name: (lambda p=p: p(**kw, generator=torch.Generator().manual_seed(0)).images)
                                    for name, p in (("a", a), ("b", b))})
    assert not (seq[0] == seq[1]).all()
    assert all((img == seq[0]).all() for img in results["a"])
    assert all((img == seq[1]).all() for img in results["b"])


@torch.no_grad()
def test_a_failed_call_in_another_thread_does_not_unmask_the_call_in_flight():
    """Thread B's call fails before it takes the denoiser (a timestep out of range) while thread A's call is half
    way through; PyTorch still runs B's post-hook, which must leave A's masks alone."""
    import threading

    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl")
    inputs = unet_inputs(pipe.unet)
    with TLoRAPatch(pipe, TLoRAConfig(8, 1, 1.0)):
        alone = pipe.unet(timestep=999, **inputs).sample
        reached, b_done, errors = threading.Event(), threading.Event(), []

        def pause_once(module, args):
            if not reached.is_set() and threading.current_thread() is threading.main_thread():
                reached.set()
                assert b_done.wait(60)

        def b():
            assert reached.wait(60)
            try:
                pipe.unet(timestep=5000, **inputs)
            except ValueError as e:
                errors.append(e)
            finally:
                b_done.set()

        hook = pipe.unet.up_blocks[0].register_forward_pre_hook(pause_once)
        thread = threading.Thread(target=b)
        thread.start()
        try:
            during = pipe.unet(timestep=999, **inputs).sample
        finally:
            hook.remove()
            thread.join()
    assert errors, "thread B's call should have been refused"
    assert torch.equal(during, alone)


@torch.no_grad()
def test_threads_two_independent_pipelines():
    a, b = tiny_pipeline("flux"), tiny_pipeline("flux", seed=1)
    add_lora(a.transformer, "flux")
    add_lora(b.transformer, "flux", seed=7)
    kw = dict(tiny_prompt_embeds(a), num_inference_steps=4, height=64, width=64, output_type="np")
    with TLoRAPatch(a, TLoRAConfig(8, 1, 1.0)), TLoRAPatch(b, TLoRAConfig(8, 5, 2.0)):
        seq = [p(**kw, generator=torch.Generator().manual_seed(0)).images for p in (a, b)]
        results = run_concurrently({name: (lambda p=p: p(**kw, generator=torch.Generator().manual_seed(0)).images)
                                    for name, p in (("a", a), ("b", b))})
    assert all((img == seq[0]).all() for img in results["a"])
    assert all((img == seq[1]).all() for img in results["b"])


def test_mask_reaches_each_device_once_without_host_round_trip():
    """Layers on different devices get the mask on their own device, converted once per call per
    (device, dtype). Meta tensors stand in for a second device: they have no data, so any host
    read of the mask there would raise."""

    from tlora_diffusers.runtime.layer import LayerMask
    from tlora_diffusers.runtime.slot import CallMasks

    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    call = CallMasks({"a": mask})

    def layer(rank_dim, name):
        return LayerMask(None, "a", rank_dim, False, name)

    cpu_out = torch.ones(2, 3, 4)
    meta_out = torch.empty(2, 3, 4, device="meta", dtype=torch.bfloat16)
    conv_meta = torch.empty(2, 4, 5, 5, device="meta", dtype=torch.bfloat16)
    a = call.view_for(layer(-1, "layer on cpu"), cpu_out)
    b = call.view_for(layer(-1, "layer on meta"), meta_out)
    c = call.view_for(layer(1, "conv on meta"), conv_meta)
    assert a.device.type == "cpu" and b.device.type == "meta" and b.dtype == torch.bfloat16
    assert (cpu_out * a)[1, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert c.shape == (2, 4, 1, 1) and (meta_out * b).device.type == "meta"
    assert call.view_for(layer(-1, "another layer on meta"), meta_out) is b  # cached: one conversion per device
    assert len(call._views) == 3


def test_a_patched_pipeline_that_is_dropped_is_freed():
    import gc
    import weakref

    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl")
    TLoRAPatch(pipe, TLoRAConfig(8, 1))  # never removed
    refs = weakref.ref(pipe), weakref.ref(pipe.unet)
    del pipe
    gc.collect()
    assert refs[0]() is None and refs[1]() is None


# -- a patch never goes stale silently ----------------------------------------------------------


def _lora_state(pipe, name, seed):
    from peft import get_peft_model_state_dict

    add_lora(pipe.unet, "sdxl", name=name, seed=seed)
    return {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet, adapter_name=name).items()}


@torch.no_grad()
def test_adapter_loaded_after_patching_is_not_left_unmasked():
    pipe = tiny_pipeline("sdxl")
    add_lora(pipe.unet, "sdxl", name="a")
    patch = TLoRAPatch(pipe, TLoRAConfig(8, 1))
    other = tiny_pipeline("sdxl")
    sd = _lora_state(other, "b", seed=4)
    pipe.load_lora_weights(sd, adapter_name="b")  # diffusers makes 'b' the active adapter
    with pytest.raises(RuntimeError, match=r"adapter\(s\) \['b'\] became active after patching"):
        pipe(**tiny_prompt_embeds(pipe), num_inference_steps=1, height=64, width=64)
    with pytest.raises(RuntimeError, match="became active after patching"):  # bare calls too
        pipe.unet(timestep=10, **unet_inputs(pipe.unet))
    patch.remove()


@torch.no_grad()
def test_unload_and_reload_after_patching_is_detected():
    pipe = tiny_pipeline("sdxl")
    sd = _lora_state(tiny_pipeline("sdxl"), "default_0", seed=0)
    pipe.load_lora_weights(sd)
    patch = TLoRAPatch(pipe, TLoRAConfig(8, 1))
    pipe.unload_lora_weights()
    pipe.load_lora_weights(sd)
    with pytest.raises(RuntimeError, match="was unloaded or replaced"):
        pipe(**tiny_prompt_embeds(pipe), num_inference_steps=1, height=64, width=64)
    patch.remove()


@torch.no_grad()
def test_bare_denoiser_fused_after_patching_is_an_error():
    unet = tiny_pipeline("sdxl").unet
    add_lora(unet, "sdxl")
    patch = TLoRAPatch(unet, TLoRAConfig(8, 1))
    for layer in unet.modules():
        if hasattr(layer, "merge") and hasattr(layer, "lora_A"):
            layer.merge()
    with pytest.raises(RuntimeError, match="fused into the base weights"):
        unet(timestep=500, **unet_inputs(unet))
    assert current_mode(unet) is None
    patch.remove()


def test_patched_pipeline_keeps_its_call_signature_and_docs():
    import inspect

    pipe = tiny_pipeline("flux")
    add_lora(pipe.transformer, "flux")
    before = inspect.signature(pipe.__call__), type(pipe).__call__.__doc__
    with TLoRAPatch(pipe, TLoRAConfig(8)):
        assert (inspect.signature(pipe.__call__), type(pipe).__call__.__doc__) == before
        assert "callback_on_step_end" in inspect.signature(pipe.__call__).parameters


@torch.no_grad()
def test_a_second_denoiser_with_lora_is_masked_too():
    pipe = tiny_pipeline("flux")
    add_lora(pipe.transformer, "flux")
    second = tiny_pipeline("flux", seed=1).transformer
    add_lora(second, "flux", seed=3)
    vars(pipe)["transformer_2"] = second  # as Wan 2.2 pipelines carry one (here never called by the loop)
    with TLoRAPatch(pipe, TLoRAConfig(8)) as patch:
        assert sorted(patch.denoisers) == ["transformer", "transformer_2"]
        assert attachment_of(second) is not None
    assert _no_hooks_left(pipe.transformer) and _no_hooks_left(second)


@pytest.mark.parametrize("value", [-5.0, -0.05, 0.0, 500.0, 1000.0, 1000.05, 1003.0, float("nan")])
def test_range_check_of_one_timestep_agrees_with_the_tensor_path(value):
    """The one-value fast path of check_range returns and refuses exactly what the tensor path does."""
    from tlora_diffusers.runtime.timesteps import check_range

    raw = 0.1  # tolerance 0.1 at T=1000
    one, many = torch.tensor([value]), torch.tensor([value, 500.0])
    try:
        expected = check_range(many, raw, 1000, "x", "scale 1")[:1]
    except ValueError as e:
        with pytest.raises(ValueError) as got:
            check_range(one, raw, 1000, "x", "scale 1")
        assert str(got.value) == str(e)
        assert abs(value - 500) > 500.05
        return
    torch.testing.assert_close(check_range(one, raw, 1000, "x", "scale 1"), expected, equal_nan=True)


@torch.no_grad()
def test_a_bare_denoiser_takes_T_from_its_family():
    """Würstchen's prior counts ratios (T = 1): bare, at r = 1 (pure noise) with min_rank 0 no rank may act, and a
    num_train_timesteps that contradicts the family is refused instead of masking every call wrongly."""
    from peft import LoraConfig

    from tlora_diffusers.testing.wuerstchen import _LORA_TARGETS, _prior

    torch.manual_seed(0)
    prior = _prior().eval()
    prior.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(_LORA_TARGETS), init_lora_weights=False))
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 16)
    r = torch.ones(1)
    prior.disable_adapters()
    base = prior(x, r, c)
    prior.enable_adapters()
    assert not torch.allclose(prior(x, r, c), base)  # the LoRA acts when unmasked
    with TLoRAPatch(prior, TLoRAConfig(4, 0)) as patch:
        assert patch.num_train_timesteps == 1
        torch.testing.assert_close(prior(x, r, c), base, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_train_timesteps=1000 contradicts the wuerstchen model family"):
        TLoRAPatch(prior, TLoRAConfig(4, 0), num_train_timesteps=1000)
