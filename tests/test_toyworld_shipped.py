"""The toy world as the repository ships it (``training/toyworld/shipped/``, made by ``python -m training.toyworld
--rebuild``): its files are the manifest's, the world reaches the ceilings that hold in its report (a named
appearance drawn, the oracle), and the shipped encoder keeps claim 2 (the dual path keeps the prompt's context).
What does not hold there (claims 0 and 3), holds by less than the seeds' noise (claims 1 and 4), or holds by a
hair (v* alone: 0.609 against its 0.6), is not asserted.

Every figure is recomputed here from the shipped files, on fewer images than the report (one or two per prompt), and
asserted with a margin that this seed-to-seed noise does not reach; each beside a broken control that fails
the same assertion: the prompt without the appearance's words, a zeroed LoRA at alpha 0, an untrained encoder.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from datencoder_core import (DATEncoderError, LoRAConfig, LoRAFactors, TuningConfig, load_encoder, personalize,
                             personalize_from_word)
from training.evaluate.concepts import load_photo
from training.evaluate.sampling import ConceptPrediction, generate
from training.toyworld import build, checks, shipped, world
from training.toyworld.models import load_world_models
from training.toyworld.truth import IDENTITY_CHANCE, WorldTruth

SAMPLING = {"steps": 20, "guidance": checks.GUIDANCE}


@pytest.fixture(scope="module")
def shipped_world(tmp_path_factory):
    folder = build.shipped_world(tmp_path_factory.mktemp("cache"))
    models = load_world_models(folder / "sd", folder / "clip_vision.safetensors")
    concepts = sorted(p for p in (folder / "concepts").iterdir() if p.is_dir())
    return folder, models.backend(LoRAConfig()), WorldTruth(folder / "truth.safetensors"), concepts


def _identity(backend, truth, concept, prediction, alpha: float) -> float:
    """Mean truth_identity over the world's contexts, one image each."""
    scores = []
    for phrase in world.CONTEXTS.values():
        text = "a photo of a {} " + phrase
        images = generate(backend, prediction, text, [0], alpha=alpha, **SAMPLING)
        scores.append(truth.score(images, concept, text)["truth_identity"])
    return float(np.mean(scores))


def test_the_shipped_files_are_the_manifests_and_a_changed_one_is_refused(tmp_path):
    manifest = shipped.read_manifest()
    assert {"world/truth.safetensors", "encoders/contrastive.safetensors"} <= set(manifest["files"])
    assert sum((shipped.SHIPPED / name).stat().st_size for name in manifest["files"]) <= 40e6
    copy = tmp_path / "shipped"
    shutil.copytree(shipped.SHIPPED, copy)
    with open(copy / "world" / "truth.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(DATEncoderError, match="truth.safetensors: its sha256 differs"):
        shipped.read_manifest(copy)


@pytest.mark.parametrize("named", [True, False])
def test_the_base_model_draws_a_held_out_appearance_told_in_words(shipped_world, named):
    """Named ("a photo of a red star with a yellow stripe on the grass"), every concept's appearance is drawn at
    identity well above the ceiling's 0.8; the same prompt without the colour words (the control) sits near
    chance."""
    _, backend, truth, concepts = shipped_world
    no_lora = LoRAFactors({s.name: torch.zeros(1, s.in_features) for s in backend.sites},
                          {s.name: torch.zeros(s.out_features, 1) for s in backend.sites}, 1.0)
    scores = []
    for concept in concepts:
        meta = json.loads((concept / "concept.json").read_text())
        (token,) = backend.word_token_ids(meta["class"])
        word = ConceptPrediction(backend.token_embeddings[token].float(), no_lora, token)
        phrase = world.object_phrase("{}", *meta["appearance"]) if named else "{}"
        for context in world.CONTEXTS.values():
            text = f"a photo of a {phrase} {context}"
            scores.append(truth.score(generate(backend, word, text, [0], alpha=0.0, **SAMPLING), concept,
                                      text)["truth_identity"])
    identity = float(np.mean(scores))
    assert (identity > checks.CEILINGS["prompt_identity"]) if named else (identity < IDENTITY_CHANCE + 0.2), identity


@pytest.fixture(scope="module")
def oracles(shipped_world):
    """The oracle of two concepts (the report's build has all six): ``checks.ORACLE_TUNING`` from the class word,
    no encoder."""
    _, backend, _, concepts = shipped_world
    tuned = []
    for concept in concepts[:2]:
        meta = json.loads((concept / "concept.json").read_text())
        photo = load_photo(sorted(concept.glob("*.png"))[0])[None]
        with torch.enable_grad():
            tuned.append((concept, personalize_from_word(backend, meta["class"], LoRAConfig(), photo,
                                                         checks.ORACLE_TUNING)))
    return tuned


@pytest.mark.parametrize("broken", [False, True])
def test_per_concept_tuning_reaches_the_oracle_ceiling(shipped_world, oracles, broken):
    """The oracle draws each of two concepts at identity above the ceiling's 0.8 at alpha 1; the same concept
    with its LoRA zeroed, sampled at alpha 0 (the control: the untouched model and the class word), sits near
    chance."""
    _, backend, truth, _ = shipped_world
    scores = []
    for concept, oracle in oracles:
        if broken:
            oracle = dataclasses.replace(oracle, lora=LoRAFactors(
                {k: torch.zeros_like(v) for k, v in oracle.lora.down.items()}, oracle.lora.up, oracle.lora.scale))
        scores.append(_identity(backend, truth, concept, oracle, 0.0 if broken else 1.0))
    identity = float(np.mean(scores))
    assert (identity < IDENTITY_CHANCE + 0.2) if broken else (identity > checks.CEILINGS["oracle_identity"]), scores


@pytest.mark.parametrize("dual_path", [True, False])
def test_the_shipped_encoder_keeps_the_prompts_context_on_the_dual_path(shipped_world, dual_path):
    """Claim 2 (the report: full 1.000 ± 0.000 against no_dual_path 0.888 ± 0.043 over three seeds): the shipped
    encoder + 12 steps (``TuningConfig``) on the dual path, alpha 0.25 in tuning and sampling, draws the prompt's
    context in more than 0.98 of the images (two per prompt) of the six concepts x four contexts; the control, the
    same with the dual path off (alpha 1), does not. Here every image on the dual path has the context at
    probability >= 0.998 (1.000); off it, both images of one prompt have it at 0.000 (the concept whose v*'s
    nearest word is "snow", "in the snow") and the others at >= 0.998 (0.958): no image is near the threshold."""
    _, backend, truth, concepts = shipped_world
    encoder, encoder_id = load_encoder(shipped.shipped_encoders()["contrastive"])
    alpha = TuningConfig().alpha_blend if dual_path else 1.0
    scores = []
    for concept in concepts:
        photo = load_photo(sorted(concept.glob("*.png"))[0])[None]
        with torch.enable_grad():
            learned = personalize(backend, encoder, encoder_id, photo, TuningConfig(alpha_blend=alpha))
        for phrase in world.CONTEXTS.values():
            text = "a photo of a {} " + phrase
            images = generate(backend, learned, text, [0, 1], alpha=alpha, **SAMPLING)
            scores.append(truth.score(images, concept, text)["truth_editability"])
    editability = float(np.mean(scores))
    assert (editability > 0.98) if dual_path else (editability < 0.98), editability
