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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from datencoder_core import Concept, LoRAFactors, TuningConfig
from training.headless.comfyui import REPO, ComfyUIServer, WorkflowError, free_port

NODES = {
    "DATEncoderLoader": ([], ["DATENCODER"]),
    "DATEncoderPersonalize": (["MODEL", "CLIP", "VAE", "CLIP_VISION", "DATENCODER", "IMAGE"], ["CONCEPT"]),
    "DATEncoderPersonalizeFromWord": (["MODEL", "CLIP", "VAE", "IMAGE"], ["CONCEPT"]),
    "DATEncoderLoadConcept": ([], ["CONCEPT"]),
    "DATEncoderSaveConcept": (["CONCEPT"], []),
    "DATEncoderExportConcept": (["CONCEPT"], []),
    "DATEncoderDualPathPatch": (["MODEL", "CONCEPT"], ["MODEL"]),
    "DATEncoderConceptList": (["CONCEPT"], ["CONCEPT_LIST"]),
    "DATEncoderApplyConceptToken": (["CLIP", "CONCEPT"], ["CONDITIONING"]),
}
TUNING = TuningConfig(steps=7, lr=1e-3, alpha_blend=0.5, seed=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory, comfyui_release):
    base = tmp_path_factory.mktemp("comfyui")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-datencoder").symlink_to(REPO)
    concepts = base / "models" / "datencoder_concepts"
    concepts.mkdir(parents=True)
    lora = LoRAFactors({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": torch.randn(4, 8)},
                       {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": torch.randn(8, 4)}, 1.0)
    Concept(torch.randn(768), lora, 2368, "cat</w>", "fp", "enc@1", TUNING, ("attn1.to_q",)).save(
        concepts / "cat.safetensors")
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
    # Short texts that the editor shows whole on a node of the default width (the whole provenance and the
    # full paths are in the records below): no absolute paths, two lines at most.
    texts = {node: output["text"] for node, output in result.history["outputs"].items()}
    assert texts == {"1": ["nearest word: cat</w>\ntuning: steps=7, lr=0.001, alpha_blend=0.5"],
                     "2": ["saved copy.safetensors"], "3": ["saved cat.safetensors in loras/ and embeddings/"]}
    assert copy.tuning == TUNING and copy.lora_targets == ("attn1.to_q",)
    # What code reads (the demo, the editor's extension): the nodes' structured ui record, through /history's JSON.
    records = {node: output["datencoder"] for node, output in result.history["outputs"].items()}
    assert records == {
        "1": [{"token": "cat</w>", "token_id": 2368, "encoder_id": "enc@1", "tuning": TUNING.to_dict(),
               "lora_targets": ["attn1.to_q"]}],
        "2": [{"files": [str(base / "models" / "datencoder_concepts" / "copy.safetensors")], "saved": True}],
        "3": [{"files": [str(base / "models" / folder / "cat.safetensors") for folder in ("loras", "embeddings")],
               "saved": True}]}


def test_load_concept_reads_a_concept_overwritten_by_save_concept(server):
    """Same server, same Load Concept input: after Save Concept replaced the file, the new concept is
    served, not ComfyUI's cached output."""
    concepts = server.base / "models" / "datencoder_concepts"
    (concepts / "mine.safetensors").write_bytes((concepts / "cat.safetensors").read_bytes())
    dog = Concept.load(concepts / "cat.safetensors")
    dog.token, dog.v_star = "dog</w>", torch.randn(768)
    dog.save(concepts / "dog.safetensors")

    serve_mine = {  # ComfyUI keeps cached outputs of the nodes of the last prompt: all three prompts have these
        "1": {"class_type": "DATEncoderLoadConcept", "inputs": {"concept_name": "mine.safetensors"}},
        "2": {"class_type": "DATEncoderSaveConcept",
              "inputs": {"concept": ["1", 0], "name": "served", "overwrite": True}}}
    overwrite_mine = {
        "3": {"class_type": "DATEncoderLoadConcept", "inputs": {"concept_name": "dog.safetensors"}},
        "4": {"class_type": "DATEncoderSaveConcept",
              "inputs": {"concept": ["3", 0], "name": "mine", "overwrite": True}}}

    first = server.run(serve_mine, timeout=60)
    assert first.history["outputs"]["1"]["text"][0].startswith("nearest word: cat</w>\n")
    server.run({**serve_mine, **overwrite_mine}, timeout=60)  # Save Concept replaces the file Load Concept reads
    again = server.run(serve_mine, timeout=60)
    assert torch.equal(Concept.load(concepts / "served.safetensors").v_star, dog.v_star)  # not the cached cat
    assert again.history["outputs"]["1"]["text"][0].startswith("nearest word: dog</w>\n")


def test_load_concept_reads_format_1_files(server):
    """A concept saved before provenance was recorded loads, says so, and is saved again as format 2."""
    concepts = server.base / "models" / "datencoder_concepts"
    tensors = load_file(concepts / "cat.safetensors")
    save_file(tensors, str(concepts / "old.safetensors"), metadata={
        "format": "datencoder.concept", "format_version": "1", "token_id": "2368", "token": "cat</w>", "rank": "4",
        "scale": "1.0", "alpha_blend": "0.25", "base_fingerprint": "fp", "encoder_id": "enc@0"})
    result = server.run({
        "1": {"class_type": "DATEncoderLoadConcept", "inputs": {"concept_name": "old.safetensors"}},
        "2": {"class_type": "DATEncoderSaveConcept", "inputs": {"concept": ["1", 0], "name": "old_resaved",
                                                                "overwrite": False}}}, timeout=60)
    assert result.history["outputs"]["1"]["text"] == ["nearest word: cat</w>\ntuning: not recorded (format 1 file)"]
    assert result.history["outputs"]["1"]["datencoder"][0]["tuning"] is None
    resaved = safe_open(str(concepts / "old_resaved.safetensors"), framework="pt").metadata()
    assert resaved["format_version"] == "2" and "alpha_blend" not in resaved and resaved["tuning"] == "null"


def test_a_name_with_folders_is_refused_when_queued(server):
    """Checked by ComfyUI's input validation: the prompt is rejected before any node runs."""
    prompt = {
        "1": {"class_type": "DATEncoderLoadConcept", "inputs": {"concept_name": "cat.safetensors"}},
        "2": {"class_type": "DATEncoderSaveConcept",
              "inputs": {"concept": ["1", 0], "name": "../escape", "overwrite": False}},
    }
    with pytest.raises(WorkflowError, match=r"node 2 \(DATEncoderSaveConcept\): .*without folders"):
        server.run(prompt, timeout=60)
    assert not (server.base / "models" / "escape.safetensors").exists()


def test_save_concept_never_fails_on_an_existing_name(server):
    """The same concept again: the file is kept as is. Another concept under a taken name: the next free
    <name>_NNNNN; the file there is never replaced (without overwrite)."""
    concepts = server.base / "models" / "datencoder_concepts"
    (concepts / "taken.safetensors").write_bytes(b"keep")

    def save(name, source="cat.safetensors"):
        run = server.run({
            "1": {"class_type": "DATEncoderLoadConcept", "inputs": {"concept_name": source}},
            "2": {"class_type": "DATEncoderSaveConcept", "inputs": {"concept": ["1", 0], "name": name,
                                                                    "overwrite": False}}}, timeout=60)
        output = run.history["outputs"]["2"]
        [record] = output["datencoder"]
        assert [os.path.basename(file) for file in record["files"]] == [output["text"][0].split(" ")[-1]]
        return output["text"][0], record["saved"]

    assert save("taken") == ("saved taken_00001.safetensors", True)
    assert save("taken_again") == ("saved taken_again.safetensors", True)
    stat = (concepts / "taken_again.safetensors").stat()
    assert save("taken_again", source="taken_00001.safetensors") == (
        "unchanged (same concept) taken_again.safetensors", False)  # a new prompt, the same concept
    assert (concepts / "taken_again.safetensors").stat().st_ino == stat.st_ino
    assert (concepts / "taken.safetensors").read_bytes() == b"keep"


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


def test_the_error_type_is_short_and_the_message_first(server):
    """ComfyUI shows a failed node's error as exception_type and exception_message: the type is the
    pack's short name, not the module path ComfyUI loaded the pack under."""
    with pytest.raises(WorkflowError, match="not a readable .safetensors file"):
        server.run({"1": {"class_type": "DATEncoderLoader", "inputs": {"encoder_name": "broken.safetensors"}},
                    "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}, timeout=60)
    entry = list(server.get("/history").values())[-1]
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["exception_type"] == "datencoder.DATEncoderError"
    assert error["exception_message"].startswith(str(server.base / "models" / "datencoder" / "broken.safetensors"))


def test_a_prompt_without_the_placeholder_is_refused_when_queued(server):
    """Rejected by ComfyUI's input validation with the reason on Apply Concept Token: nothing runs."""
    prompt = {
        "1": {"class_type": "DATEncoderLoadConcept", "inputs": {"concept_name": "cat.safetensors"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "none.safetensors", "type": "stable_diffusion"}},
        "3": {"class_type": "DATEncoderApplyConceptToken",
              "inputs": {"clip": ["2", 0], "concept": ["1", 0], "text": "a photo of a cat", "placeholder": "S*"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
    }
    with pytest.raises(WorkflowError, match=r"node 3 \(DATEncoderApplyConceptToken\): .*does not contain the "
                                            r"placeholder 'S\*'"):
        server.run(prompt, timeout=60)


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_make_comfyui_serves_the_editor_with_the_pack(tmp_path, comfyui_release):
    """The README's `make comfyui`, on another port and base directory, until /object_info answers."""
    port = free_port()
    log = tmp_path / "make-comfyui.log"
    process = subprocess.Popen(["make", "--no-print-directory", "comfyui", f"PORT={port}", f"COMFYUI_HOME={tmp_path}",
                                f"COMFYUI_PATH={comfyui_release}"],
                               cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
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
        assert "Failed to initialize database" not in log.read_text()  # its database is in COMFYUI_HOME/user/
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
