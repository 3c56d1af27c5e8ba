"""The shipped scenes model: checksums, stock offline loading, prompt following, and the experiment's pipeline.

CI never trains the base: these tests load the committed weights, check them, sample a few
images, and run the experiment's code path for a few training steps.
"""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tlora_diffusers.scenes import ATTRIBUTES, EXAMPLE_TLORA, PIPELINE, WEIGHTS, load_evaluator, load_pipeline, \
    render, sample_scene, scene_words, verify_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("tlora_experiment", ROOT / "benchmarks" / "experiment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_every_shipped_file_matches_its_checksum_and_a_changed_one_is_named(tmp_path):
    verify_weights()
    listed = [line.split(maxsplit=1)[1] for line in (WEIGHTS / "SHA256SUMS").read_text().splitlines()]
    assert "evaluator.safetensors" in listed and "pipeline/unet/diffusion_pytorch_model.safetensors" in listed
    assert "examples/sks-shape-tlora.safetensors" in listed
    total = sum((WEIGHTS / name).stat().st_size for name in listed)
    assert total <= 20 * 2**20, f"the shipped weights are {total / 2**20:.1f} MB"
    copy = tmp_path / "weights"
    shutil.copytree(WEIGHTS, copy)
    with open(copy / "evaluator.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match=r"evaluator.safetensors: SHA-256 .* does not match"):
        verify_weights(copy)
    shutil.copy(WEIGHTS / "evaluator.safetensors", copy / "evaluator.safetensors")
    (copy / "pipeline" / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model_index.json: listed in"):
        verify_weights(copy)


def test_loads_with_stock_from_pretrained_offline(pipe):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    assert type(pipe) is StableDiffusionPipeline
    again = DiffusionPipeline.from_pretrained(str(PIPELINE), local_files_only=True)
    assert type(again) is StableDiffusionPipeline
    sched = pipe.scheduler.config
    assert sched.prediction_type == "v_prediction" and sched.rescale_betas_zero_snr and sched.timestep_spacing == "trailing"
    assert sum(p.numel() for p in pipe.unet.parameters()) < 8e6


@torch.no_grad()
def test_follows_its_prompts_on_a_few_samples(pipe, evaluator):
    """Eight seeded full captions: every attribute read back on (nearly) every image."""
    import random

    from tlora_diffusers.scenes.evaluate import classify, generate

    rng = random.Random(7)
    scenes = [sample_scene(rng) for _ in range(8)]
    images = generate(pipe, [scene_words(s) for s in scenes], seed=7)
    assert images.shape == (8, 3, 32, 32)
    pred = classify(evaluator, images)
    for attribute in ATTRIBUTES:
        hits = sum(int(pred[attribute][i]) == s.labels()[attribute] for i, s in enumerate(scenes))
        assert hits >= 6, f"{attribute}: {hits}/8"


def test_committed_prompt_following_is_at_least_0_9_for_every_attribute():
    """The ≥ 256-sample measurement committed with the weights (made by scenes.build / the weights README)."""
    result = json.loads((WEIGHTS / "prompt_following.json").read_text())
    assert result["n"] >= 256
    for kind in ("full", "single"):
        for attribute in ATTRIBUTES:
            assert result[kind][attribute] >= 0.9, (kind, attribute, result[kind][attribute])


def test_the_evaluator_reads_renders_of_every_attribute(evaluator):
    import random

    from tlora_diffusers.scenes.evaluate import classify, rendered

    rng = random.Random(3)
    scenes = [sample_scene(rng) for _ in range(64)]
    pred = classify(evaluator, rendered(scenes))
    for attribute in ATTRIBUTES:
        acc = sum(int(pred[attribute][i]) == s.labels()[attribute] for i, s in enumerate(scenes)) / len(scenes)
        assert acc >= 0.95, (attribute, acc)
    assert render(scenes[0]).shape == (32, 32, 3)


@torch.no_grad()
def test_the_example_tlora_loads_with_stock_diffusers_and_the_mask_changes_the_image(pipe):
    from tlora_diffusers import TLoRAPatch
    from tlora_diffusers.scenes.evaluate import generate

    pipe.load_lora_weights(str(EXAMPLE_TLORA), adapter_name="example")
    try:
        with TLoRAPatch(pipe) as patch:
            assert patch.config.min_rank < patch.config.max_rank
            masked = generate(pipe, ["a sks shape on a blue background"], seed=0, steps=8)
        unmasked = generate(pipe, ["a sks shape on a blue background"], seed=0, steps=8)
    finally:
        pipe.delete_adapters("example")
    assert (masked - unmasked).abs().max() > 0.05


def test_the_experiment_pipeline_runs_in_seconds(experiment, pipe, evaluator, tmp_path):
    """Two checkpoints of LoRA and a T-LoRA (training extended by resume), masked and unmasked samples, the
    summary, the report and the plot."""
    from tlora_diffusers.scenes.evaluate import concept_scene, customization_prompts

    items = len(customization_prompts(concept_scene(0), 1))
    rows = [dict(experiment.run_one(config, 4, 0, [2, 4], 3e-4, tmp_path, pipe, evaluator, 1, PIPELINE), seconds=1.0)
            for config in ("lora", "tlora_min1")]
    for row in rows:
        assert [c["step"] for c in row["curve"]] == [2, 4]
        for c in row["curve"]:
            assert 0 <= c["TS"] <= 1 and -1 <= c["IS"] <= 1 and c["n"] == items
            assert ("unmasked" in c) == (row["config"] != "lora")
    assert rows[1]["min_rank"] == 1 and rows[0]["min_rank"] == 4
    result = experiment.write_results(tmp_path, "t", rows, ["test"], [2, 4], 1, items)
    summary = result["summary"]
    assert set(summary["table"]) == {"lora/r4", "tlora_min1/r4"}
    assert summary["matched_vs_lora"]["tlora_min1/r4/TS"]["n"] == 1
    assert set(summary["mask_ab"]["tlora_min1/r4"]) >= {"IS", "TS", "copy_rate", "saturation", "per_step"}
    md = (tmp_path / "t.md").read_text()
    assert "| LoRA |" in md and "masked − unmasked" in md and (tmp_path / "t.png").stat().st_size > 0
    assert not any(tmp_path.glob("*-r4-s0-*"))  # each run's training folder is removed after it
    # A stopped run continues from its kept points (training resumes bit-identically); a folder trained past a
    # checkpoint whose point was not kept starts over. Both give the uninterrupted run's curve.
    from tlora_diffusers.training import train

    run_dir = tmp_path / "lora-r4-s0-lr0.0003"
    for trained_to, kept in ((2, [dict(rows[0]["curve"][0], kept=True)]), (4, [])):
        train(experiment._config("lora", 4, 0, tmp_path / "concept-0.png", run_dir, trained_to, 3e-4, PIPELINE))
        (run_dir / "experiment-points.jsonl").write_text("".join(json.dumps(p) + "\n" for p in kept))
        again = experiment.run_one("lora", 4, 0, [2, 4], 3e-4, tmp_path, pipe, evaluator, 1, PIPELINE)
        assert again["curve"][0].pop("kept", False) == bool(kept)  # the kept point is used, not re-measured
        assert again["curve"] == rows[0]["curve"] and not run_dir.exists()
    tables = experiment.readme_tables(result)
    assert "| LoRA (1 seeds) |" in tables and "| T-LoRA, min_rank 1, ΔIS |" in tables
    # One seed of the planned five: the missing ones are named, and no interval is made from one value.
    assert experiment.coverage(rows) == {"lora/r4": {"ran": [0], "missing": [1, 2, 3, 4]},
                                         "tlora_min1/r4": {"ran": [0], "missing": [1, 2, 3, 4]}}
    assert "LoRA r4: 1, 2, 3, 4" in tables and "| LoRA, r4 | 0 | 1, 2, 3, 4 |" in md
    assert "(n = 1)" in md and "[" not in tables.split("| ΔTS at matched IS |")[1].split("\n\n")[0]
    # Phases run into different folders combine into one result (rows deduplicated, commands kept).
    for phase, row in (("a", rows[0]), ("b", rows[1]), ("c", rows[0])):
        work = tmp_path / phase / "experiment-work"
        work.mkdir(parents=True)
        (work / "rows.jsonl").write_text(json.dumps(dict(row, key=f"{row['config']}-key")) + "\n")
        (work / "commands.json").write_text(json.dumps([f"run {phase}"]))
    combined = experiment.combine(tmp_path / "all", [tmp_path / p for p in "abc"], "combine")
    assert len(combined["rows"]) == 2 and combined["commands"] == ["run a", "run b", "run c", "combine"]
    assert (tmp_path / "all" / "tlora_effect.json").is_file()


def test_bootstrap_interval_and_matched_interpolation(experiment):
    mean, lo, hi = experiment.bootstrap_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and 1.0 <= lo < mean < hi <= 4.0
    curve = [{"IS": 0.2, "TS": 0.9}, {"IS": 0.6, "TS": 0.5}]
    assert experiment._interp(curve, 0.4, "TS") == pytest.approx(0.7)
    assert experiment._interp(curve, 0.0, "TS") == 0.9 and experiment._interp(curve, 1.0, "TS") == 0.5


def test_readme_reports_the_committed_experiment():
    """The README's "Does it work?" tables are generated from the committed run (benchmarks/results/tlora_effect.json),
    and every three-decimal number its prose quotes is one of that run's (in the tables or tlora_effect.md)."""
    import re

    from benchmarks.experiment import README_BEGIN, README_END, readme_tables, readme_with_tables

    readme = (ROOT / "README.md").read_text()
    result = json.loads((ROOT / "benchmarks" / "results" / "tlora_effect.json").read_text())
    assert sorted(result["ranks"]) == [4, 8, 16] and result["checkpoints"][-1] >= 1600
    assert {"lora", "tlora_min1", "tlora_half"} <= {k.split("/")[0] for k in result["summary"]["table"]}
    assert readme_with_tables(readme, readme_tables(result)) == readme, (
        "README's experiment tables are stale: python benchmarks/experiment.py --out benchmarks/results --readme README.md")
    section = readme[readme.index("## Does it work?"):readme.index("## Use it with your pipeline")]
    prose = section.replace(section[section.index(README_BEGIN):section.index(README_END)], "")
    known = (readme_tables(result) + (ROOT / "benchmarks" / "results" / "tlora_effect.md").read_text()).replace("−", "-")
    quoted = re.findall(r"[+−-]?\d\.\d{3}", prose)
    assert quoted, "the prose quotes no number"
    for number in quoted:
        assert number.replace("−", "-") in known, f"README quotes {number}, which is not in the committed results"

def test_min_rank_and_mask_advice_follows_the_committed_experiment(capsys):
    """What the README lead, the model card, `train --help` and the config table say about min_rank and the mask
    is what benchmarks/results/tlora_effect.json shows."""
    from tlora_diffusers.training.card import _HOW_TLORA

    s = json.loads((ROOT / "benchmarks" / "results" / "tlora_effect.json").read_text())["summary"]
    ab, matched = s["mask_ab"], s["matched_vs_lora"]
    # "weakened the concept of rank-4 T-LoRAs with min_rank 1": masked - unmasked IS above 0 with its interval
    assert ab["tlora_min1/r4"]["IS"]["ci95"][0] > 0
    # "broke rank-4 ortho ones": the unmasked concept similarity collapses (both ortho configurations)
    assert min(ab["ortho_min1/r4"]["IS"]["mean"], ab["ortho_half/r4"]["IS"]["mean"]) > 0.15
    # "with min_rank 1 also oversaturated": masked - unmasked saturation below 0 with its interval
    assert ab["ortho_min1/r4"]["saturation"]["ci95"][1] < 0
    # "neither 1 nor rank/2 was consistently better": each is ahead at some rank
    ahead = [matched[f"tlora_min1/r{r}/TS"]["mean"] > matched[f"tlora_half/r{r}/TS"]["mean"] for r in (4, 8, 16)]
    assert any(ahead) and not all(ahead)
    readme = (ROOT / "README.md").read_text()
    lead = readme[:readme.index("## Run it")]
    phrase = "weakened the concept of rank-4 T-LoRAs with min_rank 1"
    assert phrase in " ".join(lead.split()) and "broke rank-4 ortho ones" in " ".join(lead.split())
    assert phrase in _HOW_TLORA and "broke rank-4 ortho" in _HOW_TLORA
    assert "neither 1 nor `max_rank // 2` was consistently better" in readme
    # "Ortho ... learnt the concept more slowly than LoRA at every learning rate tried" (the sweep)
    assert s["sweep"] and all(v["max_IS"]["mean"] < v["lora_max_IS"]["mean"] for v in s["sweep"].values())
    assert "learnt the concept more\n  slowly than LoRA at every learning rate tried" in readme
    from tlora_diffusers.cli.main import main

    assert main(["train", "--help"]) == 0
    assert "neither 1 nor rank/2 was consistently better" in " ".join(capsys.readouterr().out.split())
