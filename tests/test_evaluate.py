"""``python -m training.evaluate`` (issue 12): the tiny preset end to end, the metrics against a plain
reference computation, and the input errors raised before any model is loaded."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datencoder_core import DATEncoderError
from training.evaluate import run as evaluate
from training.evaluate.concepts import read_prompts, write_tiny_concepts
from training.evaluate.metrics import METRIC_FILES, TINY, MetricModels, _square, mean_pairwise_cosine
from training.evaluate.report import METRICS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("evaluate")
    return output, evaluate.main(["--preset", "tiny", "--output", str(output)])


def test_tiny_preset_writes_every_expected_key_and_the_plot(tiny_run):
    output, summary = tiny_run
    variants = evaluate.TINY_DEFAULTS["variants"]
    on_disk = json.loads((output / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(on_disk) == {"settings", "variants", "concepts", "published"}
    assert list(on_disk["variants"]) == variants
    for s in on_disk["variants"].values():
        assert s["concepts"] == 2 and s["peak_gpu_bytes"] is None  # CPU
        for metric in METRICS:
            low, high = s[metric]["ci95"]
            assert low <= s[metric]["mean"] <= high
    for concept in ("cat", "cup"):
        assert set(on_disk["concepts"][concept]) == set(variants)
        for variant, r in on_disk["concepts"][concept].items():
            assert r["personalization_s"] > 0 and r["generation_s"] > 0
            assert len(r["prompts"]) == 1 and set(METRICS) <= set(r["prompts"][0])
            grid = Image.open(output / "grids" / concept / f"{variant}.png")
            assert grid.size[0] > grid.size[1]  # one row of 2 images
    with open(output / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["level"] for r in rows} == {"variant", "concept", "prompt"}
    assert len(rows) == len(variants) * (1 + 2 * 2)
    assert set(METRICS) <= set(rows[0])
    assert (output / "tradeoff.png").stat().st_size > 10_000
    assert json.loads((output / "settings.json").read_text())["tuning"]["steps"] == evaluate.TINY_TUNING["steps"]


def test_rerun_skips_done_units_and_the_same_seeds_give_the_same_numbers(tiny_run):
    output, summary = tiny_run
    redo = output / "units" / "cat" / "full.json"
    before = redo.read_text()
    redo.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (output / "units").rglob("*.json")}
    again = evaluate.main(["--preset", "tiny", "--output", str(output)])
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # skipped
    assert json.loads(redo.read_text())["prompts"] == json.loads(before)["prompts"]  # redone, same numbers
    with pytest.raises(DATEncoderError, match="holds a run with other settings"):
        evaluate.main(["--preset", "tiny", "--output", str(output), "--seed", "1"])
    for variant, s in again["variants"].items():
        assert {m: s[m] for m in METRICS} == {m: summary["variants"][variant][m] for m in METRICS}


def test_two_processes_share_the_concepts_and_give_the_numbers_of_one(tiny_run, tmp_path):
    """accelerate launch --cpu --num_processes 2 (the concepts split between the processes) completes every
    unit, and each unit's scores equal the 1-process run's (same seeds; float sums may run in another order
    on another thread count, hence 1e-4)."""
    from training.headless.comfyui import free_port

    output, variants = tmp_path / "two", ["full", "encoder_only"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(free_port()), "-m", "training.evaluate", "--preset", "tiny", "--output", str(output),
              "--variants", *variants]
    result = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((output / "metrics.json").read_text())
    assert list(two["variants"]) == variants
    for concept in ("cat", "cup"):
        for variant in variants:
            mine, reference = two["concepts"][concept][variant], tiny_run[1]["concepts"][concept][variant]
            assert mine["token"] == reference["token"]
            for got, expected in zip(mine["prompts"], reference["prompts"], strict=True):
                for metric in METRICS:
                    assert got[metric] == pytest.approx(expected[metric], abs=1e-4), (concept, variant, metric)


@pytest.fixture(scope="module")
def metric_models(tiny_run):
    return MetricModels(tiny_run[0] / "tiny_inputs" / "metrics_models", TINY)


def test_a_metric_of_an_image_with_itself_is_one_and_of_two_different_images_below(metric_models):
    photos = torch.rand(2, 96, 80, 3, generator=torch.Generator().manual_seed(0))
    same = metric_models.score(photos[:1], [photos[0]], "a cat")
    other = metric_models.score(photos[:1], [photos[1]], "a cat")
    for metric in ("dino", "clip_i_b32", "clip_i_b16"):
        assert same[metric] == pytest.approx(1.0, abs=1e-5)
        assert other[metric] < 1 - 1e-4


def _reference_cosine(a, b):
    a, b = a.double().numpy(), b.double().numpy()
    return np.mean([[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in b] for x in a])


def test_metrics_agree_with_a_plain_cosine_of_embeddings(metric_models):
    g = torch.Generator().manual_seed(1)
    generated, references = torch.rand(3, 64, 64, 3, generator=g), [torch.rand(70, 50, 3, generator=g) for _ in range(2)]
    scores = metric_models.score(generated, references, "a red cup")
    with torch.no_grad():
        dino = lambda x: metric_models.dino(_square(x, 256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
        assert scores["dino"] == pytest.approx(
            _reference_cosine(dino(generated), torch.cat([dino(r[None]) for r in references])), abs=1e-5)
        for key, model in metric_models.clip.items():
            mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
            image = lambda x: model.encode_image(_square(x, 224, 224, mean, std))
            refs = torch.cat([image(r[None]) for r in references])
            assert scores[f"clip_i_{key[5:]}"] == pytest.approx(_reference_cosine(image(generated), refs), abs=1e-5)
            text = model.encode_text(metric_models.tokenizer(["a red cup"]))
            assert scores[f"clip_t_{key[5:]}"] == pytest.approx(_reference_cosine(image(generated), text), abs=1e-5)
    a, b = torch.randn(4, 8, generator=g), torch.randn(5, 8, generator=g)
    assert mean_pairwise_cosine(a, b) == pytest.approx(_reference_cosine(a, b), abs=1e-6)


# Input errors: the model files do not exist, so an error about them (or from loading) would mean the
# input was not checked first.
def _real_args(tmp_path, concepts, metrics, prompts=None):
    args = ["--encoder", str(tmp_path / "no-encoder.safetensors"), "--base", str(tmp_path / "no-sd15"),
            "--clip-vision", str(tmp_path / "no-vit-h.safetensors"), "--concepts", str(concepts),
            "--metrics-models", str(metrics), "--output", str(tmp_path / "out")]
    return args + (["--prompts", str(prompts)] if prompts else [])


@pytest.fixture
def inputs(tmp_path):
    concepts, metrics = tmp_path / "concepts", tmp_path / "metrics"
    write_tiny_concepts(concepts)
    metrics.mkdir()
    for name in METRIC_FILES.values():
        (metrics / name).write_bytes(b"")
    return concepts, metrics


def test_a_missing_metric_weight_file_is_named(tmp_path, inputs):
    concepts, metrics = inputs
    (metrics / METRIC_FILES["clip_b16"]).unlink()
    with pytest.raises(DATEncoderError, match=f"missing \\['{METRIC_FILES['clip_b16']}'\\]"):
        evaluate.main(_real_args(tmp_path, concepts, metrics))


def test_an_empty_concept_folder_is_named(tmp_path, inputs):
    concepts, metrics = inputs
    (concepts / "empty").mkdir()
    with pytest.raises(DATEncoderError, match="concept folder .*empty has no photos"):
        evaluate.main(_real_args(tmp_path, concepts, metrics))


def test_a_concept_without_concept_json_is_named(tmp_path, inputs):
    concepts, metrics = inputs
    (concepts / "cup" / "concept.json").unlink()
    with pytest.raises(DATEncoderError, match="concept folder .*cup has no concept.json"):
        evaluate.main(_real_args(tmp_path, concepts, metrics))


def test_a_prompt_without_the_placeholder_is_named(tmp_path, inputs):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("[object]\nrecontextualization: a {} in the snow\n[live]\naccessorization: a dog in a hat\n")
    with pytest.raises(DATEncoderError, match=r"prompts.txt:4: the prompt 'a dog in a hat' needs the placeholder"):
        evaluate.main(_real_args(tmp_path, *inputs, prompts))


def test_the_official_dreambench_prompt_file_is_read(tmp_path):
    official = tmp_path / "prompts_and_classes.txt"
    official.write_text("Classes\nsubject_name,class\ndog,dog\n\nPrompts\nObject Prompts\nprompt_list = [\n"
                        "'a {0} {1} in the jungle'.format(unique_token, class_token),\n"
                        "'a red {0} {1}'.format(unique_token, class_token),\n]\n\nLive Subject Prompts\n"
                        "prompt_list = [\n'a {0} {1} wearing a red hat'.format(unique_token, class_token),\n]\n")
    prompts = read_prompts(official)
    assert [p.template for p in prompts["object"]] == ["a {} in the jungle", "a red {}"]
    assert [p.with_class("dog") for p in prompts["live"]] == ["a dog wearing a red hat"]
    project = read_prompts(evaluate.PROJECT_PROMPTS)
    assert {k: len(v) for k, v in project.items()} == {"object": 25, "live": 25}
    assert {p.category for p in project["live"]} == {"recontextualization", "accessorization", "property change"}


def test_full_and_scratch_take_a_step_count_and_other_variants_do_not():
    """``full:N`` and ``scratch:N`` are ``full`` and ``scratch`` at N steps (the toy world's identity curves);
    any other ``name:N`` or an unknown name is refused with the list."""
    from datencoder_core import TuningConfig

    tuning = TuningConfig()
    assert evaluate.parse_variant("full:24", tuning) == evaluate.Variant("full:24", True, 24, tuning.alpha_blend)
    assert evaluate.parse_variant("scratch:0", tuning) == evaluate.Variant("scratch:0", False, 0, tuning.alpha_blend)
    assert evaluate.parse_variant("full", tuning) == evaluate.Variant("full", True, tuning.steps, tuning.alpha_blend)
    for name in ("encoder_only:3", "full:x", "fast"):
        with pytest.raises(DATEncoderError, match="full:N or scratch:N"):
            evaluate.parse_variant(name, tuning)
