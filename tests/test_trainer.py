"""The DreamBooth trainer end to end on tiny models: files stock diffusers loads, resume, errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tlora_diffusers import TLoRAConfig, TLoRAPatch
from conftest import slot_mode
from tlora_diffusers.tiny import save_tiny_pipeline
from tlora_diffusers.training import TrainConfig, train


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: save_tiny_pipeline(kind, root / kind) for kind in ("sdxl", "flux", "flux2-klein")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    x = np.zeros((80, 64, 3), np.uint8)
    x[20:50, 16:48] = (230, 30, 30)
    Image.fromarray(x).save(folder / "concept.png")
    return folder


def config(models, image_dir, out, kind="sdxl", **kw):
    base = dict(model=str(models[kind]), images=str(image_dir), prompt="a photo of sks square", output_dir=str(out),
                resolution=64, steps=4, learning_rate=1e-3, rank=4, min_rank=1, progress=False)
    return TrainConfig(**{**base, **kw})


def load_and_generate(model_dir, out):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))  # stock diffusers
    with TLoRAPatch(pipe) as patch:  # config from the file
        image = pipe(prompt="a sks square", num_inference_steps=2, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(image).all()
    return patch.config


@pytest.mark.parametrize("kind, variant", [("sdxl", "vanilla"), ("sdxl", "ortho"), ("flux", "vanilla"),
                                           ("flux", "ortho"), ("flux2-klein", "vanilla"), ("flux2-klein", "ortho")])
def test_train_end_to_end_and_stock_load(models, images, tmp_path, kind, variant):
    result = train(config(models, images, tmp_path, kind, variant=variant, validation_prompts=["a sks square"],
                          validation_steps=2, checkpoint_every=2))
    assert result.output_file == tmp_path / "pytorch_lora_weights.safetensors"
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert [p.name for p in result.validation_images] == ["step-000002-0.png", "step-000004-0.png"]
    cfg = load_and_generate(models[kind], tmp_path)
    assert cfg == TLoRAConfig(4, 1, 1.0, layout="paired" if variant == "ortho" else "plain")
    logs = [json.loads(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "tlora_train.json").read_text())["status"] == "done"


def test_loss_falls_on_a_single_image(models, images, tmp_path):
    result = train(config(models, images, tmp_path, steps=60, learning_rate=1e-2))
    assert result.probe_loss_end < 0.97 * result.probe_loss_start


class Interrupt(BaseException):
    pass


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
def test_resume_after_interruption_equals_uninterrupted_run(models, images, tmp_path, variant, monkeypatch):
    full = train(config(models, images, tmp_path / "full", steps=8, checkpoint_every=3, variant=variant))
    expected = load_file(full.output_file)

    import tlora_diffusers.training.trainer as trainer

    real_save = trainer.save_checkpoint
    saves = []

    def save_then_crash(*args, **kw):
        path = real_save(*args, **kw)
        saves.append(path)
        if len(saves) == 2:  # crash right after the step-6 checkpoint
            raise Interrupt()
        return path

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(Interrupt):
        train(config(models, images, tmp_path / "cut", steps=8, checkpoint_every=3, variant=variant))
    assert not (tmp_path / "cut" / "pytorch_lora_weights.safetensors").exists()
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    resumed = train(config(models, images, tmp_path / "cut", steps=8, checkpoint_every=3, variant=variant, resume=True))
    got = load_file(resumed.output_file)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert resumed.losses == full.losses


def test_gradient_checkpointing_and_accumulation_run(models, images, tmp_path):
    a = train(config(models, images, tmp_path / "a", gradient_checkpointing=True, steps=3))
    b = train(config(models, images, tmp_path / "b", steps=3))
    assert a.losses == pytest.approx(b.losses, rel=1e-4)
    train(config(models, images, tmp_path / "c", gradient_accumulation_steps=2, batch_size=2, steps=2))


@pytest.mark.parametrize(
    "change, exc, fragment",
    [
        (dict(images="/nonexistent/dir"), FileNotFoundError, "instance image not found"),
        (dict(rank=4096), ValueError, "rank 4096 is larger than targeted layer"),
        (dict(target_modules=["no_such_layer"]), ValueError, "match no Linear or Conv2d layer"),
        (dict(variant="lokr"), ValueError, "variant must be 'vanilla' or 'ortho', got 'lokr'"),
        (dict(min_rank=9), ValueError, "min_rank must be an int in [0, max_rank=4], got 9"),
        (dict(steps=0), ValueError, "steps must be an int >= 1, got 0"),
        (dict(prompt=" "), ValueError, "prompt must be a non-empty string"),
        (dict(model="/nonexistent/model"), FileNotFoundError, "model /nonexistent/model: no such folder"),
    ],
)
def test_errors_before_any_training_step(models, images, tmp_path, change, exc, fragment):
    with pytest.raises(exc) as e:
        train(config(models, images, tmp_path, **change))
    assert fragment in str(e.value)
    assert not (tmp_path / "logs.jsonl").exists()


def test_unreadable_image_and_occupied_output_dir(models, images, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="x.png: cannot read this image"):
        train(config(models, bad, tmp_path / "o1"))
    train(config(models, images, tmp_path / "run", steps=1))
    with pytest.raises(ValueError, match="already holds a training run; pass --resume .* or --overwrite"):
        train(config(models, images, tmp_path / "run", steps=1))
    with pytest.raises(ValueError, match=r"resume: settings that change the result differ from the run .*: rank \(was 4, now 2\)"):
        train(config(models, images, tmp_path / "run", steps=1, rank=2, resume=True))
    train(config(models, images, tmp_path / "run", steps=1, overwrite=True))


def test_trainer_leaves_a_given_pipeline_as_it_was(models, images, tmp_path):
    from diffusers import DiffusionPipeline

    from conftest import state_hash

    pipe = DiffusionPipeline.from_pretrained(str(models["sdxl"]))
    before, cls = state_hash(pipe.unet), type(pipe)
    train(config(models, images, tmp_path, steps=2, variant="ortho"), pipe=pipe)
    assert type(pipe) is cls and state_hash(pipe.unet) == before
    assert not any(type(m).__name__ == "OrthoTLoRALayer" for m in pipe.unet.modules())


def test_keyboard_interrupt_inside_a_training_step(models, images, tmp_path):
    from diffusers import DiffusionPipeline

    from conftest import state_hash

    pipe = DiffusionPipeline.from_pretrained(str(models["sdxl"]))
    before, cls = state_hash(pipe.unet), type(pipe)
    seen = []

    def interrupt(module, args):
        seen.append(slot_mode(pipe.unet))
        if module.training:
            raise KeyboardInterrupt

    h = pipe.unet.mid_block.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(config(models, images, tmp_path, steps=3), pipe=pipe)
    h.remove()
    assert seen and seen[-1] == "outputs"  # the mask was active inside the step
    assert slot_mode(pipe.unet) is None  # and is gone after the interrupt
    assert type(pipe) is cls and state_hash(pipe.unet) == before and not getattr(pipe.unet, "peft_config", None)
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()


def test_mixed_precision_bf16_then_full_precision_in_one_process(models, images, tmp_path):
    bf16 = train(config(models, images, tmp_path / "bf16", mixed_precision="bf16", steps=2))
    fp32 = train(config(models, images, tmp_path / "fp32", steps=2))  # accelerate's global state is released
    assert all(np.isfinite(bf16.losses)) and all(np.isfinite(fp32.losses))
    assert bf16.losses != fp32.losses


@pytest.mark.parametrize("variant", ["vanilla", "ortho"])
def test_every_checkpoint_holds_its_tlora_and_its_state_files_are_not_taken_for_one(models, images, tmp_path, variant):
    from safetensors.torch import load_file

    from tlora_diffusers import load_tlora, read_schedule

    result = train(config(models, images, tmp_path, steps=4, checkpoint_every=2, variant=variant))
    final = load_file(str(result.output_file))
    at_end = load_file(str(tmp_path / "checkpoint-4" / "pytorch_lora_weights.safetensors"))
    mid = load_file(str(tmp_path / "checkpoint-2" / "pytorch_lora_weights.safetensors"))
    assert at_end.keys() == final.keys() and all(torch.equal(at_end[k], final[k]) for k in final)
    assert mid.keys() == final.keys() and any(not torch.equal(mid[k], final[k]) for k in final)  # two steps earlier
    assert read_schedule(tmp_path / "checkpoint-2" / "pytorch_lora_weights.safetensors") == read_schedule(result.output_file)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(models["sdxl"]))
    assert load_tlora(pipe, tmp_path / "checkpoint-2").path.name == "pytorch_lora_weights.safetensors"
    for name in ("params.safetensors", "optimizer.safetensors", "rng.safetensors"):
        with pytest.raises(ValueError, match=rf"{name}: training state of a tlora_diffusers checkpoint \(for --resume\), "
                                             r"not a T-LoRA; the checkpoint's T-LoRA is .*checkpoint-2"):
            load_tlora(pipe, tmp_path / "checkpoint-2" / name)
    (tmp_path / "checkpoint-2" / "pytorch_lora_weights.safetensors").unlink()  # as an older version wrote it
    with pytest.raises(ValueError, match=r"checkpoint-2: a training checkpoint without T-LoRA weights"):
        load_tlora(pipe, tmp_path / "checkpoint-2")


def test_failed_resume_names_the_checkpoint_and_leaves_the_pipeline_as_it_was(models, images, tmp_path):
    from diffusers import DiffusionPipeline

    from conftest import state_hash

    train(config(models, images, tmp_path, steps=4, checkpoint_every=2))
    ckpt = tmp_path / "checkpoint-4" / "params.safetensors"
    ckpt.write_bytes(b"\x00\x01")  # corrupt the latest checkpoint (the run's end)
    pipe = DiffusionPipeline.from_pretrained(str(models["sdxl"]))
    before, cls = state_hash(pipe.unet), type(pipe)
    with pytest.raises(ValueError, match="checkpoint-4: cannot resume from this checkpoint"):
        train(config(models, images, tmp_path, steps=4, checkpoint_every=2, resume=True), pipe=pipe)
    assert type(pipe) is cls and state_hash(pipe.unet) == before and not getattr(pipe.unet, "peft_config", None)
    assert "_tlora_patch" not in vars(pipe)


def test_trainer_does_not_touch_a_lora_the_user_had(models, images, tmp_path):
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

    pipe = DiffusionPipeline.from_pretrained(str(models["sdxl"]))
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False), adapter_name="style")
    for n, p in pipe.unet.named_parameters():
        if ".style." in n:
            p.data = p.data.bfloat16()  # a half-precision LoRA the user keeps
    style = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if ".style." in n}
    train(config(models, images, tmp_path, steps=2), pipe=pipe)
    after = {n: p for n, p in pipe.unet.named_parameters() if ".style." in n}
    assert after.keys() == style.keys()
    assert all(after[n].dtype == torch.bfloat16 and torch.equal(after[n], style[n]) for n in style)
    assert list(pipe.unet.peft_config) == ["style"]


@pytest.mark.parametrize("accum, every", [(2, 3), (3, 2)])
def test_resume_is_bit_identical_with_gradient_accumulation(models, images, tmp_path, monkeypatch, accum, every):
    kw = dict(steps=8, checkpoint_every=every, gradient_accumulation_steps=accum, batch_size=2)
    full = train(config(models, images, tmp_path / "full", **kw))
    import tlora_diffusers.training.trainer as trainer

    real_save, saves = trainer.save_checkpoint, []

    def save_then_crash(*args, **k):
        path = real_save(*args, **k)
        saves.append(path)
        if len(saves) == 1:  # crash right after the first checkpoint, in the middle of an accumulation cycle
            raise Interrupt()
        return path

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(Interrupt):
        train(config(models, images, tmp_path / "cut", **kw))
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    resumed = train(config(models, images, tmp_path / "cut", resume=True, **kw))
    expected, got = load_file(full.output_file), load_file(resumed.output_file)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert resumed.losses == full.losses


def test_extending_a_finished_run_equals_a_longer_run(models, images, tmp_path):
    longer = train(config(models, images, tmp_path / "long", steps=6))
    train(config(models, images, tmp_path / "ext", steps=4))
    extended = train(config(models, images, tmp_path / "ext", steps=6, resume=True))
    expected, got = load_file(longer.output_file), load_file(extended.output_file)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert extended.losses == longer.losses
    with pytest.raises(ValueError, match=r"already trained 6 steps; pass steps >= 6"):
        train(config(models, images, tmp_path / "ext", steps=5, resume=True))


@pytest.mark.parametrize("change, name", [(dict(gradient_accumulation_steps=2), "gradient_accumulation_steps"),
                                          (dict(mixed_precision="bf16"), "mixed_precision"),
                                          (dict(max_grad_norm=0.5), "max_grad_norm"),
                                          (dict(batch_size=2), "batch_size")])
def test_a_resume_that_changes_the_result_is_refused_naming_the_setting(models, images, tmp_path, change, name):
    train(config(models, images, tmp_path, steps=2, checkpoint_every=1))
    with pytest.raises(ValueError, match=rf"settings that change the result differ .*: {name} \(was"):
        train(config(models, images, tmp_path, steps=3, resume=True, **change))


def test_a_resume_on_other_images_is_refused(models, images, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "concept.png").write_bytes((images / "concept.png").read_bytes())
    train(config(models, folder, tmp_path / "run", steps=2))
    x = np.zeros((64, 64, 3), np.uint8)
    Image.fromarray(x).save(folder / "concept.png")  # same path, other pixels
    with pytest.raises(ValueError, match=r"differ .*: images \(was"):
        train(config(models, folder, tmp_path / "run", steps=3, resume=True))


def test_model_card_and_push_to_hub_up_to_the_upload(models, images, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, exist_ok: calls.setdefault("create", repo_id) and type("R", (), {"repo_id": repo_id}))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self: {"name": "me"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the Hub calls are all stubbed
    train(config(models, images, tmp_path, steps=2, validation_prompts=["a sks square"], validation_steps=2,
                 push_to_hub=True, hub_model_id="me/sks-square"))
    card = huggingface_hub.ModelCard.load(tmp_path / "README.md")
    # a local base model is no Hub repo id: left out of the Hub metadata, named in the text
    assert card.data.base_model is None and card.data.instance_prompt == "a photo of sks square"
    assert f"`{models['sdxl'].name}`" in card.text and "https://github.com/)" not in card.text
    assert {"lora", "t-lora", "diffusers"} <= set(card.data.tags)
    text = card.text
    assert "max_rank | 4" in text and "min_rank | 1" in text and "TLoRAPatch(pipe)" in text
    assert "pipe.load_lora_weights(\"me/sks-square\")" in text and "validation/step-000002-0.png" in text
    assert calls["create"] == "me/sks-square" and calls["upload"]["folder_path"] == str(tmp_path)
    assert "checkpoint-*" in calls["upload"]["ignore_patterns"]


def test_push_to_hub_is_checked_before_training_and_a_failed_upload_says_where_the_weights_are(models, images, tmp_path,
                                                                                           monkeypatch):
    import huggingface_hub

    out = tmp_path / "offline"
    with pytest.raises(OSError, match=r"--push-to-hub to me/x: the Hugging Face Hub is switched off here.*nothing was "
                                      r"trained"):
        train(config(models, images, out, steps=2, push_to_hub=True, hub_model_id="me/x"))
    assert not out.exists()  # refused before anything was written
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self: {"name": "me"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def broken(*a, **k):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "create_repo", broken)
    with pytest.raises(OSError, match=r"the upload to the Hub repo me/x failed.*saved in .*pytorch_lora_weights"):
        train(config(models, images, out, steps=2, push_to_hub=True, hub_model_id="me/x"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_a_lora_baseline_card_does_not_call_it_a_t_lora(models, images, tmp_path):
    import huggingface_hub

    train(config(models, images, tmp_path, steps=2, rank=4, min_rank=4))
    card = huggingface_hub.ModelCard.load(tmp_path / "README.md")
    assert card.text.lstrip().startswith("# LoRA:") and "t-lora" not in card.data.tags and "TLoRAPatch" not in card.text


def test_two_processes_under_accelerate_launch_match_one_process_with_the_combined_batch(models, images, tmp_path):
    """gloo on the CPU: each process masks its own samples by their own timesteps; DDP averages."""
    import os
    import subprocess
    import sys

    common = ["--model", str(models["sdxl"]), "--images", str(images), "--prompt", "a photo of sks square", "--steps", "3",
              "--resolution", "64", "--rank", "4", "--lr", "1e-3", "--checkpoint-every", "2", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "tlora_diffusers.cli", "train", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # the main process reports (and writes) once
    one = train(config(models, images, tmp_path / "one", steps=3, batch_size=2, checkpoint_every=2, learning_rate=1e-3))
    a, b = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors"), load_file(one.output_file)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4  # all-reduce order: float rounding only
    run = json.loads((tmp_path / "two" / "tlora_train.json").read_text())
    assert run["identity"]["num_processes"] == 2 and len((tmp_path / "two" / "logs.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
