"""The demo and train commands end to end on the tiny model."""

import json

import numpy as np
from PIL import Image

from tlora_diffusers.cli import main


def test_demo_command_writes_grid_schedule_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--train-steps", "30", "--sample-steps", "4", "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"demo output folder: {out}" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["max_rank"] == 8 and len(summary["train"]["loss_curve"]) == 30
    assert summary["mean_abs_difference_masked_vs_unmasked"] > 0  # the mask changes the images
    for key in ("grid", "schedule", "concept"):
        with Image.open(summary["files"][key]) as im:
            im.load()
            assert im.width > 32 and im.height > 32
    with Image.open(out / "grid.png") as grid:
        assert grid.height > grid.width  # three labelled rows: masked, unmasked, base
    assert (out / "tlora" / "pytorch_lora_weights.safetensors").is_file()


def test_train_command_and_its_errors(tmp_path, capsys):
    from tlora_diffusers.tiny import save_tiny_pipeline

    model = save_tiny_pipeline("sdxl", tmp_path / "model")
    img = tmp_path / "dog.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(img)
    args = ["train", "--model", str(model), "--images", str(img), "--prompt", "a sks dog", "--out",
            str(tmp_path / "out"), "--resolution", "64", "--steps", "3", "--rank", "4", "-q"]
    assert main(args) == 0
    assert "wrote " in capsys.readouterr().out
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert main(args) == 2  # the folder holds a run now
    assert "already holds a training run; pass --resume" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--min-rank", "7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tlora-diffusers: error: ") and "min_rank" in err and "Traceback" not in err
    assert main(["train", "--help"]) == 0
    assert "pipe.load_lora_weights" in capsys.readouterr().out
