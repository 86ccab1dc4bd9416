"""The main job (``make demo``): the workflow's API twin in a real ComfyUI server on the demo model set."""

import json

import numpy as np
import pytest
from PIL import Image

from datencoder_core import Concept, architecture_fingerprint, load_encoder
from training import demo_models
from training.demo import main

QUICK = ["--set", "5.steps=2", "--set", "5.timesteps_per_step=1", "--set", "9.width=128", "--set", "9.height=128",
         "--set", "10.steps=2"]


def test_demo_runs_the_workflow_and_reports(demo_models_folder, tmp_path, comfyui_release, monkeypatch):
    monkeypatch.setenv("COMFYUI_PATH", str(comfyui_release))  # the ComfyUI that `make demo` runs
    output = tmp_path / "demo"
    report = main(["--cache", str(demo_models_folder.parent), "--output", str(output), *QUICK])

    assert json.loads((output / "report.json").read_text()) == report
    assert len(report["images"]) == 2  # the workflow's batch of 2
    for path in report["images"]:
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (128, 128, 3) and pixels.std() > 0
    assert len(report["tuning_losses"]) == 2 and all(np.isfinite(report["tuning_losses"]))
    assert 0 < report["personalization_seconds"] < report["workflow_seconds"]
    assert report["peak_memory_mib"] > 1000 and report["device"]  # ViT-H alone is 1.2 GB

    concept = Concept.load(output / "comfyui" / "models" / "datencoder_concepts" / "my_concept.safetensors")
    encoder, encoder_id = load_encoder(demo_models_folder / "datencoder" / demo_models.ENCODER)
    assert report["nearest_word"] == concept.token and concept.encoder_id == encoder_id
    assert concept.base_fingerprint == architecture_fingerprint(encoder.sites, encoder.config.token_dim)
    assert len(concept.lora.down) == len(encoder.sites) == 42


def test_demo_names_missing_model_files(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--models", str(tmp_path), "--output", str(tmp_path / "out")])
    message = capsys.readouterr().err
    for expected in ("checkpoints/v1-5-pruned-emaonly.safetensors",
                     "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "datencoder/datencoder_sd15.safetensors"):
        assert str(tmp_path / expected) in message
