"""The pack in a real ComfyUI server (main.py --cpu), on each release the tests run: registration, and
prompts through POST /prompt."""

import json
import os
import re
import signal
import subprocess
import time
import urllib.request

import pytest
import torch

from datencoder_core import Concept, LoRAFactors
from training.comfyui import REPO, ComfyUIServer, WorkflowError, free_port

NODES = {
    "DATEncoderLoader": ([], ["DATENCODER"]),
    "DATEncoderPersonalize": (["MODEL", "CLIP", "VAE", "CLIP_VISION", "DATENCODER", "IMAGE"], ["CONCEPT"]),
    "DATEncoderLoadConcept": ([], ["CONCEPT"]),
    "DATEncoderSaveConcept": (["CONCEPT"], []),
    "DATEncoderExportConcept": (["CONCEPT"], []),
    "DATEncoderDualPathPatch": (["MODEL", "CONCEPT"], ["MODEL"]),
    "DATEncoderApplyConceptToken": (["CLIP", "CONCEPT"], ["CONDITIONING"]),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, comfyui_release):
    base = tmp_path_factory.mktemp("comfyui")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-datencoder").symlink_to(REPO)
    concepts = base / "models" / "datencoder_concepts"
    concepts.mkdir(parents=True)
    lora = LoRAFactors({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": torch.randn(4, 8)},
                       {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": torch.randn(8, 4)}, 1.0)
    Concept(torch.randn(768), lora, 2368, "cat</w>", 0.25, "fp", "enc@1").save(concepts / "cat.safetensors")
    encoders = base / "models" / "datencoder"
    encoders.mkdir()
    (encoders / "broken.safetensors").write_bytes(b"not a safetensors file")
    (encoders / "a_concept.safetensors").write_bytes((concepts / "cat.safetensors").read_bytes())
    with ComfyUIServer(base, comfyui=comfyui_release) as running:
        yield running


def test_all_nodes_register_with_their_types(server):
    info = server.get("/object_info")
    log = server.log_tail(chars=10**6)
    assert "IMPORT FAILED" not in log, log[-3000:]
    for node, (input_types, output_types) in NODES.items():
        assert node in info, f"{node} missing from /object_info"
        required = info[node]["input"]["required"]
        assert [spec[0] for spec in required.values() if spec[0] in (
            "MODEL", "CLIP", "VAE", "CLIP_VISION", "DATENCODER", "IMAGE", "CONCEPT")] == input_types
        assert info[node]["output"] == output_types
        assert info[node]["category"] == "DATEncoder"
    assert info["DATEncoderLoadConcept"]["input"]["required"]["concept_name"][1]["options"] == ["cat.safetensors"]


def test_load_save_and_export_through_the_executor(server):
    base = server.base
    prompt = {
        "1": {"class_type": "DATEncoderLoadConcept", "inputs": {"concept_name": "cat.safetensors"}},
        "2": {"class_type": "DATEncoderSaveConcept", "inputs": {"concept": ["1", 0], "name": "copy", "overwrite": False}},
        "3": {"class_type": "DATEncoderExportConcept", "inputs": {"concept": ["1", 0], "name": "cat", "overwrite": False}},
    }
    result = server.run(prompt, timeout=60)
    original = Concept.load(base / "models" / "datencoder_concepts" / "cat.safetensors")
    copy = Concept.load(base / "models" / "datencoder_concepts" / "copy.safetensors")
    assert torch.equal(copy.v_star, original.v_star) and copy.token == "cat</w>"
    assert (base / "models" / "loras" / "cat.safetensors").is_file()
    assert (base / "models" / "embeddings" / "cat.safetensors").is_file()
    assert result.history["outputs"]["1"]["text"] == ["nearest word: cat</w>"]


@pytest.mark.parametrize("name,message", [("../escape", "without folders"), ("taken", "exists")])
def test_bad_file_names_are_refused_clearly(server, name, message):
    base = server.base
    prompt = {
        "1": {"class_type": "DATEncoderLoadConcept", "inputs": {"concept_name": "cat.safetensors"}},
        "2": {"class_type": "DATEncoderSaveConcept", "inputs": {"concept": ["1", 0], "name": name, "overwrite": False}},
    }
    (base / "models" / "datencoder_concepts" / "taken.safetensors").write_bytes(b"keep")
    with pytest.raises(WorkflowError, match=r"node 2 \(DATEncoderSaveConcept\) failed: .*" + re.escape(message)):
        server.run(prompt, timeout=60)
    assert not (base / "models" / "escape.safetensors").exists()
    assert (base / "models" / "datencoder_concepts" / "taken.safetensors").read_bytes() == b"keep"


@pytest.mark.parametrize("encoder_name,message", [
    ("broken.safetensors", "broken.safetensors: not a readable .safetensors file"),
    ("a_concept.safetensors", "a_concept.safetensors: expected a 'datencoder.encoder' file, found a "
                              "'datencoder.concept' file"),
])
def test_bad_encoder_files_give_an_error_naming_the_file(server, encoder_name, message):
    prompt = {"1": {"class_type": "DATEncoderLoader", "inputs": {"encoder_name": encoder_name}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    with pytest.raises(WorkflowError, match=r"node 1 \(DATEncoderLoader\) failed: .*" + re.escape(message)):
        server.run(prompt, timeout=60)


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_make_comfyui_serves_the_editor_with_the_pack(tmp_path, comfyui_release):
    """The README's `make comfyui`, on another port and base directory, until /object_info answers."""
    port = free_port()
    process = subprocess.Popen(["make", "--no-print-directory", "comfyui", f"PORT={port}", f"COMFYUI_HOME={tmp_path}",
                                f"COMFYUI_PATH={comfyui_release}"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(240):
            try:
                info = _get(f"http://127.0.0.1:{port}/object_info/DATEncoderPersonalize")
                break
            except OSError:
                assert process.poll() is None, "make comfyui exited"
                time.sleep(0.5)
        else:
            pytest.fail("make comfyui did not serve within 120 s")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert b"<html" in page.read().lower()  # the editor (comfyui-frontend-package)
        assert info["DATEncoderPersonalize"]["display_name"] == "Personalize Concept"
        assert (tmp_path / "custom_nodes" / "comfyui-datencoder").resolve() == REPO
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
