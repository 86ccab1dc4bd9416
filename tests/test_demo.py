"""The main job (``make demo``) on the tiny models: it runs, reports, and writes files that load."""

import json

from datencoder_core import Concept
from training.demo import main


def test_demo_writes_concept_export_and_report(tmp_path):
    report = main(["--output", str(tmp_path), "--steps", "2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "concept.safetensors", "concept_embedding.safetensors", "concept_lora.safetensors", "report.json"]
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["personalization_seconds"] > 0 and report["peak_memory_mib"] > 0
    concept = Concept.load(tmp_path / "concept.safetensors")
    assert concept.token == report["nearest_word"] and concept.encoder_id == "random-init"
