"""Every LoRA-capable pipeline class of the installed diffusers is tested, masked or refused, and the docs say so."""

import collections
from pathlib import Path

import pytest

from tlora_diffusers.models.docs import support_markdown
from tlora_diffusers.models.support import REFUSED_DENOISERS, lora_pipelines, pipeline_support
from tlora_diffusers.testing import tiny_cases

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows():
    return pipeline_support()


def test_every_lora_capable_pipeline_is_tested_masked_or_refused(rows):
    """Enumerates diffusers: a new LoRA-capable pipeline fails this test until a tiny case covers its
    denoiser classes or its denoiser is refused with a reason."""
    assert {r.pipeline for r in rows} == set(lora_pipelines())
    unknown = [r.pipeline for r in rows if r.status not in ("tested", "masked", "refused")]
    assert not unknown, f"neither covered by a tiny case nor refused: {unknown}"
    counts = collections.Counter(r.status for r in rows)
    assert counts["tested"] >= 120 and counts["refused"] == 2, counts
    for r in rows:
        assert r.denoisers, f"{r.pipeline}: no denoiser class found"
        if r.status == "refused":
            assert r.detail in REFUSED_DENOISERS.values()
    assert "(a LoRA on PriorTransformer is refused)" in {r.pipeline: r.detail for r in rows}["StableUnCLIPPipeline"]


def test_modular_pipelines_and_every_family_released_this_year_are_covered(rows):
    status = {r.pipeline: r.status for r in rows}
    for name in ("Flux3ModularPipeline", "Krea2Pipeline", "Krea2TurboModularPipeline", "QwenImage21Pipeline",
                 "QwenImage21TurboModularPipeline", "Ideogram4Pipeline", "LTX2Pipeline", "Kandinsky5T2VPipeline",
                 "WanAnimatePipeline", "WanVACEPipeline", "SkyReelsV2DiffusionForcingPipeline", "HeliosPipeline",
                 "ErnieImagePipeline", "BriaFiboPipeline", "BriaFibo2Pipeline", "Cosmos2_5_PredictBasePipeline",
                 "SanaVideoPipeline", "ChronoEditPipeline", "PRXPipeline", "AnyFlowPipeline",
                 "HunyuanVideoFramepackPipeline", "Kandinsky3Pipeline", "TextToVideoSDPipeline", "AnimateDiffPipeline",
                 "Wan22ModularPipeline", "AnimaModularPipeline", "EchoModularPipeline"):
        assert status[name] == "tested", (name, status[name])


def test_tiny_cases_name_real_pipelines():
    import diffusers

    for case in tiny_cases().values():  # PixArt's pipelines have no LoRA loader, but PEFT puts LoRAs on it
        assert isinstance(getattr(diffusers, case.pipeline, None), type), f"{case.name}: no diffusers.{case.pipeline}"


def test_the_supported_pipelines_document_is_current():
    path = ROOT / "docs" / "supported-pipelines.md"
    assert path.read_text(encoding="utf-8") == support_markdown(), (
        "docs/supported-pipelines.md is stale: python -m tlora_diffusers.models.docs --pipelines docs/supported-pipelines.md")


def test_the_readme_lead_states_the_counts(rows):
    from tlora_diffusers.models.docs import support_counts

    counts = support_counts(rows)
    lead = (ROOT / "README.md").read_text(encoding="utf-8").split("## Run it")[0]
    masked = counts["tested"] + counts["masked"]
    assert f"**{masked} of the {counts['total']} pipeline classes of diffusers" in lead
    assert f"({counts['tested']} of them tested one by one" in lead and f"refuses the other\n{counts['refused']}" in lead
