"""The pack in a real ComfyUI server (main.py --cpu): registration, and prompts through POST /prompt."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from comfyui_runtime import REPO, comfyui_path

from datencoder_core import Concept, LoRAFactors

NODES = {
    "DATEncoderLoader": ([], ["DATENCODER"]),
    "DATEncoderPersonalize": (["MODEL", "CLIP", "VAE", "CLIP_VISION", "DATENCODER", "IMAGE"], ["CONCEPT"]),
    "DATEncoderLoadConcept": ([], ["CONCEPT"]),
    "DATEncoderSaveConcept": (["CONCEPT"], []),
    "DATEncoderExportConcept": (["CONCEPT"], []),
    "DATEncoderDualPathPatch": (["MODEL", "CONCEPT"], ["MODEL"]),
    "DATEncoderApplyConceptToken": (["CLIP", "CONCEPT"], ["CONDITIONING"]),
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post(url, payload):
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
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
    port = _free_port()
    log = open(base / "server.log", "w")
    process = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                "--base-directory", str(base)], cwd=comfyui_path(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                _get(f"{url}/system_stats")
                break
            except OSError:
                if process.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            pytest.fail("ComfyUI did not start within 120 s")
        if process.poll() is not None:
            pytest.fail("ComfyUI exited:\n" + (base / "server.log").read_text()[-3000:])
        yield url, base
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_all_nodes_register_with_their_types(server):
    url, base = server
    info = _get(f"{url}/object_info")
    log = (base / "server.log").read_text()
    assert "IMPORT FAILED" not in log, log[-3000:]
    for node, (input_types, output_types) in NODES.items():
        assert node in info, f"{node} missing from /object_info"
        required = info[node]["input"]["required"]
        assert [spec[0] for spec in required.values() if spec[0] in (
            "MODEL", "CLIP", "VAE", "CLIP_VISION", "DATENCODER", "IMAGE", "CONCEPT")] == input_types
        assert info[node]["output"] == output_types
        assert info[node]["category"] == "DATEncoder"
    assert info["DATEncoderLoadConcept"]["input"]["required"]["concept_name"][1]["options"] == ["cat.safetensors"]


def _run(url, prompt, timeout=60):
    prompt_id = _post(f"{url}/prompt", {"prompt": prompt})["prompt_id"]
    for _ in range(timeout * 4):
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.25)
    pytest.fail(f"prompt {prompt_id} did not finish in {timeout} s")


def test_load_save_and_export_through_the_executor(server):
    url, base = server
    prompt = {
        "1": {"class_type": "DATEncoderLoadConcept", "inputs": {"concept_name": "cat.safetensors"}},
        "2": {"class_type": "DATEncoderSaveConcept", "inputs": {"concept": ["1", 0], "name": "copy", "overwrite": False}},
        "3": {"class_type": "DATEncoderExportConcept", "inputs": {"concept": ["1", 0], "name": "cat", "overwrite": False}},
    }
    result = _run(url, prompt)
    assert result["status"]["status_str"] == "success", result["status"]
    original = Concept.load(base / "models" / "datencoder_concepts" / "cat.safetensors")
    copy = Concept.load(base / "models" / "datencoder_concepts" / "copy.safetensors")
    assert torch.equal(copy.v_star, original.v_star) and copy.token == "cat</w>"
    assert (base / "models" / "loras" / "cat.safetensors").is_file()
    assert (base / "models" / "embeddings" / "cat.safetensors").is_file()
    assert result["outputs"]["1"]["text"] == ["nearest word: cat</w>"]


@pytest.mark.parametrize("name,message", [("../escape", "without folders"), ("taken", "exists")])
def test_bad_file_names_are_refused_clearly(server, name, message):
    url, base = server
    prompt = {
        "1": {"class_type": "DATEncoderLoadConcept", "inputs": {"concept_name": "cat.safetensors"}},
        "2": {"class_type": "DATEncoderSaveConcept", "inputs": {"concept": ["1", 0], "name": name, "overwrite": False}},
    }
    (base / "models" / "datencoder_concepts" / "taken.safetensors").write_bytes(b"keep")
    result = _run(url, prompt)
    assert result["status"]["status_str"] == "error"
    error = next(m[1] for m in result["status"]["messages"] if m[0] == "execution_error")
    assert message in error["exception_message"] and error["node_type"] == "DATEncoderSaveConcept"
    assert not (base / "models" / "escape.safetensors").exists()
    assert (base / "models" / "datencoder_concepts" / "taken.safetensors").read_bytes() == b"keep"


@pytest.mark.parametrize("encoder_name,message", [
    ("broken.safetensors", "broken.safetensors: not a readable .safetensors file"),
    ("a_concept.safetensors", "a_concept.safetensors: expected a 'datencoder.encoder' file, found a "
                              "'datencoder.concept' file"),
])
def test_bad_encoder_files_give_an_error_naming_the_file(server, encoder_name, message):
    url, _ = server
    prompt = {"1": {"class_type": "DATEncoderLoader", "inputs": {"encoder_name": encoder_name}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    result = _run(url, prompt)
    assert result["status"]["status_str"] == "error"
    error = next(m[1] for m in result["status"]["messages"] if m[0] == "execution_error")
    assert message in error["exception_message"] and error["node_type"] == "DATEncoderLoader"


def test_make_comfyui_serves_the_editor_with_the_pack(tmp_path):
    """The README's `make comfyui`, on another port and base directory, until /object_info answers."""
    import os
    import signal

    port = _free_port()
    process = subprocess.Popen(["make", "--no-print-directory", "comfyui", f"PORT={port}", f"COMFYUI_HOME={tmp_path}"],
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
