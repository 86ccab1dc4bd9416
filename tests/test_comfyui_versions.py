"""Supported ComfyUI releases: the version check (``nodes/compat.py``) and set-up that does not depend on
``on_load``, which ComfyUI before 0.30 never calls."""

import asyncio
import logging
import tomllib

import pytest

from training.headless.comfyui import REPO, comfyui_path, pack_module
from training.headless.comfyui import comfyui_version


@pytest.fixture(scope="module")
def compat():
    return pack_module("nodes.compat")


def test_versions_compare_as_numbers(compat):
    assert compat.parse_version("0.3.75") == (0, 3, 75)
    assert compat.parse_version("v0.3.60-rc1") == (0, 3, 60)
    assert compat.parse_version(" 0.4.0+local ") == (0, 4, 0)
    # as strings, "0.3.9" > "0.3.59" and "0.30.0" < "0.3.75"
    assert compat.parse_version("0.3.9") < compat.parse_version("0.3.59") < compat.parse_version("0.3.75")
    assert compat.parse_version("0.3.75") < compat.parse_version("0.30.0") < compat.parse_version("1.0.0")
    for bad in ("0.3", "latest", "0.3.x", ""):
        with pytest.raises(ValueError, match=r"expected MAJOR.MINOR.PATCH, e.g. '0.3.75'"):
            compat.parse_version(bad)


@pytest.mark.parametrize("version", ["0.3.59", "0.3.64", "0.3.75", "0.4.0", "0.30.0", "1.2.3"])
def test_supported_releases_are_accepted(compat, version):
    assert compat.unsupported_reason(version) is None


@pytest.mark.parametrize("version,found", [
    ("0.3.58", "this is ComfyUI 0.3.58"), ("0.3.9", "this is ComfyUI 0.3.9"), ("0.2.7", "this is ComfyUI 0.2.7"),
    ("nightly", "this ComfyUI's version 'nightly' is not MAJOR.MINOR.PATCH"),
    (None, "this ComfyUI has no comfyui_version.py, so its release is unknown"),
])
def test_other_releases_get_a_reason_naming_need_found_and_fix(compat, version, found):
    reason = compat.unsupported_reason(version)
    assert reason.startswith("DATEncoder needs ComfyUI >=0.3.59 (its dual path needs CrossAttention.forward to "
                             "receive transformer_options")
    assert f"; {found}. Update ComfyUI" in reason and "\n" not in reason


def test_the_declared_range_is_the_checked_one(compat):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["comfy"]["requires-comfyui"] == compat.REQUIRES == ">=0.3.59"
    assert compat.parse_version(compat.REQUIRES.removeprefix(">=")) == compat.MINIMUM


def test_running_version_is_that_of_comfyui_path(compat):
    assert compat.running_version() == comfyui_version(comfyui_path())


def _node_list():
    return asyncio.run(pack_module("nodes.nodes").DATEncoderExtension().get_node_list())


def test_node_list_registers_the_folders_without_on_load(monkeypatch):
    """As ComfyUI 0.3.x loads the pack: get_node_list, then every schema, and on_load never."""
    import folder_paths

    paths = pack_module("nodes.paths")
    names = {k: v for k, v in folder_paths.folder_names_and_paths.items() if k not in (paths.ENCODERS, paths.CONCEPTS)}
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", names)
    yaml_folder = "/from/extra_model_paths/datencoder"
    folder_paths.add_model_folder_path(paths.ENCODERS, yaml_folder)  # what a yaml does before nodes load

    nodes = _node_list()
    assert [node.GET_SCHEMA().node_id for node in nodes][:3] == [
        "DATEncoderLoader", "DATEncoderPersonalize", "DATEncoderLoadConcept"]
    expected = {paths.ENCODERS: [f"{folder_paths.models_dir}/datencoder", yaml_folder],
                paths.CONCEPTS: [f"{folder_paths.models_dir}/datencoder_concepts"]}
    for key, folders in expected.items():
        assert folder_paths.folder_names_and_paths[key] == (folders, {".safetensors"})
    _node_list()  # a second load changes nothing
    for key, folders in expected.items():
        assert folder_paths.folder_names_and_paths[key] == (folders, {".safetensors"})


def test_an_unsupported_release_logs_once_and_every_node_refuses_at_validation(compat, caplog, monkeypatch):
    import execution
    import nodes as comfy_nodes

    monkeypatch.setattr(compat, "running_version", lambda: "0.3.52")
    with caplog.at_level(logging.ERROR, logger="datencoder"):
        refused = _node_list()
    assert [r.getMessage() for r in caplog.records] == [
        compat.unsupported_reason("0.3.52") + " Its nodes are listed but refuse to run."]
    monkeypatch.setattr(compat, "running_version", lambda: "0.3.75")
    plain = _node_list()
    assert [n.GET_SCHEMA().node_id for n in refused] == [n.GET_SCHEMA().node_id for n in plain]
    assert all(issubclass(r, p) and r.__name__ == p.__name__ for r, p in zip(refused, plain, strict=True))

    # ComfyUI's own prompt validation, as POST /prompt runs it
    load_concept = next(n for n in refused if n.__name__ == "DATEncoderLoadConcept")
    monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, "DATEncoderLoadConcept", load_concept)
    prompt = {"1": {"class_type": "DATEncoderLoadConcept", "inputs": {"concept_name": "cat.safetensors"}}}
    valid, errors, _ = asyncio.run(execution.validate_inputs("p", prompt, "1", {}))
    assert not valid
    assert [e["details"] for e in errors if e["type"] == "custom_validation_failed"] == [
        f"concept_name - {compat.unsupported_reason('0.3.52')}"]
