"""Shared fixtures: tiny random SD1.5-structured models (built in code, nothing downloaded), a real photo,
and the ComfyUI releases that server tests run on."""

import numpy as np
import pytest
import torch
from skimage import data

from training.headless.comfyui import comfyui_releases, comfyui_version
from training.models.reference import build_random_models


def pytest_generate_tests(metafunc):
    """A test (or fixture) that takes ``comfyui_release`` runs once per ComfyUI checkout in
    ``COMFYUI_RELEASES`` (``make test``: 0.30.0 and 0.3.75), with ids such as ``comfyui-0.3.75``. The
    parameter is module-scoped, so a module's server fixture starts once per release."""
    if "comfyui_release" in metafunc.fixturenames:
        releases = comfyui_releases()
        metafunc.parametrize("comfyui_release", releases, scope="module",
                             ids=[f"comfyui-{comfyui_version(path)}" for path in releases])


@pytest.fixture(scope="session")
def tiny_models():
    """Read-only models: tests that install processors or change weights build their own."""
    return build_random_models("tiny", seed=0)


@pytest.fixture(scope="session")
def backend(tiny_models):
    return tiny_models.backend()


@pytest.fixture(scope="session")
def encoder(tiny_models):
    return tiny_models.random_encoder(seed=0)


@pytest.fixture(scope="session")
def cat_image():
    """scikit-image's chelsea the cat as a ComfyUI IMAGE: (1, 300, 451, 3) float in [0, 1]."""
    return torch.from_numpy(data.chelsea().astype(np.float32) / 255.0)[None]


@pytest.fixture(scope="session")
def demo_models_folder(tmp_path_factory):
    """The demo model set (checkpoint, ViT-H-14, encoder) in a cache folder, made once per session."""
    from training.headless.demo_models import ensure_demo_models

    return ensure_demo_models(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_pretraining(tmp_path_factory):
    """The CPU quick check, run once: ``python -m training.pretrain --preset tiny`` (60 steps). Its output dir."""
    from training.pretrain.train import main

    output_dir = tmp_path_factory.mktemp("pretrain") / "run"
    main(["--preset", "tiny", "--output-dir", str(output_dir)])
    return output_dir
