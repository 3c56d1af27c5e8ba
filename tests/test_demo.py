"""The demo and train commands end to end on the tiny model."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tlora_diffusers.cli import main


def test_demo_command_on_the_shipped_model_writes_a_labelled_grid_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--train-steps", "4", "--threads", "1", "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"output folder: {out}" in printed and "what to look for:" in printed
    for row in ("LoRA", "T-LoRA, masked", "T-LoRA, no mask", "base model"):
        assert row in printed  # each row's IS / TS / copy is printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == {"LoRA", "T-LoRA, masked", "T-LoRA, no mask", "base model"}
    for m in summary["metrics"].values():
        assert {"IS", "TS", "copy_rate", "distance", "diversity", "concept"} <= set(m)
    assert set(summary["metric_meanings"]) >= {"IS", "TS", "copy_rate"}
    assert summary["trained"]["lora"]["min_rank"] == summary["rank"] > summary["trained"]["tlora"]["min_rank"]
    assert summary["commands"]["generate"].startswith("tlora-diffusers generate --model ")
    assert summary["commands"]["inspect"].startswith("tlora-diffusers inspect ")
    for key in ("lora", "tlora", "training_image", "grid"):
        assert Path(summary["files"][key]).is_file()
    assert Path(summary["files"]["pipeline"], "model_index.json").is_file()
    with Image.open(out / "grid.png") as grid:
        # 4 rows of 128-px cells + labels; 6 columns (the training image and 5 prompts)
        assert grid.width > 6 * 128 and grid.height > 4 * 128
    with Image.open(out / "training-image.png") as im:
        assert im.size == (32, 32)


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
    assert err.startswith("tlora-diffusers: error: ") and "--min-rank" in err and "Traceback" not in err
    assert main(["train", "--help"]) == 0
    assert "pipe.load_lora_weights" in capsys.readouterr().out


def test_readme_demo_paragraph_is_the_committed_run_in_the_default_configuration():
    """docs/demo-grid.png and its numbers come from `tlora-diffusers demo` with its defaults (min_rank 1, the
    library's); the README quotes that run's numbers (docs/demo-summary.json)."""
    import inspect
    import re

    from tlora_diffusers import TLoRAConfig
    from tlora_diffusers.demo import run_demo

    root = Path(__file__).resolve().parents[1]
    summary = json.loads((root / "docs" / "demo-summary.json").read_text())
    defaults = {k: v.default for k, v in inspect.signature(run_demo).parameters.items()}
    assert summary["min_rank"] == defaults["min_rank"] == TLoRAConfig(max_rank=8).min_rank
    assert (summary["rank"], summary["steps"], summary["learning_rate"], summary["seed"]) == (
        defaults["rank"], defaults["steps"], defaults["learning_rate"], defaults["seed"])
    readme = (root / "README.md").read_text()
    paragraph = readme[readme.index("In this run (rank"):readme.index("Tests (the command CI runs):")]
    assert f"rank {summary['rank']}, T-LoRA min_rank {summary['min_rank']}, {summary['steps']} steps" in paragraph
    m = summary["metrics"]
    lora, masked, unmasked = m["LoRA"], m["T-LoRA, masked"], m["T-LoRA, no mask"]
    assert f"IS {lora['IS']:.2f} vs {masked['IS']:.2f}" in paragraph
    assert f"TS {lora['TS']:.2f} vs {masked['TS']:.2f}" in paragraph
    assert f"IS {unmasked['IS']:.2f}, TS {unmasked['TS']:.2f}" in paragraph
    assert len(re.findall(r"\d\.\d\d", paragraph)) == 6  # no other number that nothing checks
    with Image.open(root / "docs" / "demo-grid.png") as grid:
        assert grid.width > 6 * 128 and grid.height > 4 * 128


def test_what_to_look_for_is_what_the_committed_experiment_measured():
    """The demo's text claims, at its rank and min_rank, what benchmarks/results/tlora_effect.json shows: T-LoRA
    follows context prompts better than LoRA at matched IS and copies the training context less, and the unmasked
    file is not burnt (saturation within 0.05 of the masked one)."""
    import inspect

    from tlora_diffusers.demo import LOOK_FOR, run_demo

    root = Path(__file__).resolve().parents[1]
    s = json.loads((root / "benchmarks" / "results" / "tlora_effect.json").read_text())["summary"]
    defaults = {k: v.default for k, v in inspect.signature(run_demo).parameters.items()}
    assert defaults["min_rank"] == 1 and "min_rank 1 (this demo's)" in LOOK_FOR
    cell = f"tlora_min1/r{defaults['rank']}"
    ts = s["matched_vs_lora"][f"{cell}/TS"]
    assert ts["mean"] > 0 and "followed such prompts better than a LoRA on average" in LOOK_FOR
    assert (ts["ci95"][0] <= 0) == ("at this demo's rank 8 its interval includes zero" in LOOK_FOR)
    assert s["matched_vs_lora"]["tlora_min1/r16/TS"]["ci95"][0] > 0 and "clear only at rank 16" in LOOK_FOR
    assert s["matched_vs_lora"][f"{cell}/copy_rate"]["mean"] < 0 and "less often" in LOOK_FOR
    ab = s["mask_ab"][cell]
    assert abs(ab["saturation"]["mean"]) < 0.05 and abs(ab["IS"]["mean"]) < 0.02 and abs(ab["TS"]["mean"]) < 0.02
    assert "it is not burnt and differs little from the masked row" in LOOK_FOR
