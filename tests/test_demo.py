"""The main job (``make demo``): the workflow's API twin in a real ComfyUI server on the demo model set."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from datencoder_core import Concept, architecture_fingerprint, load_encoder
from training.demo import (MARKER, WORKFLOW, WORKFLOW_WITHOUT_ENCODER, choose_workflow, main, personalization_result,
                           replace_output)
from training.headless import demo_models

QUICK = ["--set", "5.steps=2", "--set", "5.timesteps_per_step=1", "--set", "9.width=128", "--set", "9.height=128",
         "--set", "10.steps=2"]


def test_demo_runs_the_workflow_and_reports(demo_models_folder, tmp_path):
    """On the ComfyUI `make demo` runs (COMFYUI_PATH); test_workflows runs the same workflows on every
    supported release. On the demo set: the encoder workflow (the report's top level), then the encoder-free
    one (``without_encoder``); QUICK's ``5.*`` settings reach both Personalize nodes (the examples share ids)."""
    output = tmp_path / "demo"
    report = main(["--cache", str(demo_models_folder.parent), "--output", str(output), *QUICK])

    assert json.loads((output / "report.json").read_text()) == report
    assert (output / MARKER).is_file()  # so the next run may replace the folder
    assert len(report["images"]) == 2  # the workflow's batch of 2
    for path in report["images"]:
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (128, 128, 3) and pixels.std() > 0
    assert len(report["tuning_losses"]) == 2 and all(np.isfinite(report["tuning_losses"]))
    assert report["workflow"] == "personalize_and_generate"
    free = report["without_encoder"]
    assert free["workflow"] == "personalize_without_encoder" and len(free["images"]) == 2
    assert len(free["tuning_losses"]) == 2 and all(np.isfinite(free["tuning_losses"]))
    assert 0 < free["personalization_seconds"] < free["workflow_seconds"]
    assert 0 < report["personalization_seconds"] < report["workflow_seconds"]
    assert report["peak_memory_mib"] > 1000 and report["device"]  # ViT-H alone is 1.2 GB

    concept = Concept.load(output / "comfyui" / "models" / "datencoder_concepts" / "my_concept.safetensors")
    encoder, encoder_id = load_encoder(demo_models_folder / "datencoder" / demo_models.ENCODER)
    assert report["nearest_word"] == concept.token and concept.encoder_id == encoder_id
    with safe_open(str(demo_models_folder / "datencoder" / demo_models.ENCODER), framework="pt") as demo_file:
        assert demo_file.metadata().items() >= demo_models.DEMO_FLAG.items()  # what Personalize Concept can show
    assert concept.base_fingerprint == architecture_fingerprint(encoder.sites, encoder.config.token_dim)
    assert len(concept.lora.down) == len(encoder.sites) == 42
    # The encoder-free run's concept: a different one, so Save Concept gave it the next free name.
    free_concept = Concept.load(output / "comfyui" / "models" / "datencoder_concepts" / "my_concept_00001.safetensors")
    assert free_concept.token == free["nearest_word"] and free_concept.encoder_id != encoder_id


def test_the_report_reads_the_nodes_record_not_their_text():
    """Personalize Concept's word and losses come from its structured ui record in /history; its text is
    for people (here reworded, and the step texts are not in /history at all)."""
    outputs = {"5": {"text": ["the concept is ready: cat"],
                     "datencoder": [{"token": "cat</w>", "token_id": 2368, "encoder_id": "enc@1", "losses": [0.5, 0.25]}]}}
    assert personalization_result(outputs, "5") == ("cat</w>", [0.5, 0.25])


CHECKPOINT = "checkpoints/v1-5-pruned-emaonly.safetensors"
ENCODER_FILES = ("clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "datencoder/datencoder_sd15.safetensors")


def test_demo_names_a_missing_checkpoint_before_anything_starts(tmp_path):
    models = tmp_path / "models"
    (models / ENCODER_FILES[0]).parent.mkdir(parents=True)
    (models / ENCODER_FILES[0]).touch()  # clip_vision alone runs nothing
    with pytest.raises(SystemExit) as refused:
        main(["--models", str(models), "--output", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    message = str(refused.value)
    assert message.startswith("missing model files:") and str(models / CHECKPOINT) in message
    assert "personalize_without_encoder.json" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_demo_runs_the_workflow_your_models_folder_can_run(tmp_path):
    """The checkpoint alone: the encoder-free workflow (and the encoder files it lacks, for its log line);
    with clip_vision and the encoder as well: the encoder workflow."""
    (tmp_path / CHECKPOINT).parent.mkdir(parents=True)
    (tmp_path / CHECKPOINT).touch()
    assert choose_workflow(tmp_path) == (WORKFLOW_WITHOUT_ENCODER, [str(tmp_path / name) for name in ENCODER_FILES])
    for name in ENCODER_FILES:
        (tmp_path / name).parent.mkdir(parents=True)
        (tmp_path / name).touch()
    assert choose_workflow(tmp_path) == (WORKFLOW, [])


@pytest.mark.parametrize("where", ["a folder of yours", "the current folder", "a file"])
def test_demo_refuses_an_output_it_did_not_make(tmp_path, monkeypatch, capsys, where):
    """Refused before anything slow (no model set is made in the empty cache), and nothing is deleted."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    output = {"a folder of yours": str(mine), "the current folder": ".", "a file": str(mine / "thesis.tex")}[where]
    monkeypatch.chdir(mine)
    with pytest.raises(SystemExit, match=rf"--output {re.escape(output)}: "
                                         r"(is a file|the folder is not empty and is not a previous demo output)"):
        main(["--output", output, "--cache", str(tmp_path / "cache")])
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"] and (mine / "thesis.tex").read_text() == "precious"
    assert not (tmp_path / "cache").exists()


def test_a_previous_demo_output_or_an_empty_folder_is_replaced(tmp_path):
    previous, empty = tmp_path / "previous", tmp_path / "empty"
    (previous / "comfyui").mkdir(parents=True)
    (previous / MARKER).write_text("")
    (previous / "report.json").write_text("{}")
    empty.mkdir()
    for output in (previous, empty, tmp_path / "new" / "demo"):
        replace_output(output)
        assert [p.name for p in output.iterdir()] == [MARKER]
