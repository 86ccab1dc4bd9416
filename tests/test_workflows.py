"""The example workflows: the UI files are what the editor makes of their API twins under this server's
/object_info, and the API twins run through POST /prompt on a real ComfyUI server, on each release the
tests run, with the demo model set."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from datencoder_core import Concept, LoRAConfig, LoRAFactors, TuningConfig, architecture_fingerprint, load_encoder
from training.demo import prepare_base_directory, use_demo_models
from training.headless import demo_models
from training.headless.comfyui import REPO, ComfyUIServer

WORKFLOWS = ["personalize_and_generate", "personalize_without_encoder", "save_and_reuse_concept", "two_concepts"]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TITLE_HEIGHT = 30  # the editor draws a node's title bar above its pos
TEXT_ROOM = 80  # below a node that shows a text after a run (nodes.py's show_text): two lines and a margin
TEXT_NODES = {"DATEncoderLoader", "DATEncoderPersonalize", "DATEncoderPersonalizeFromWord", "DATEncoderLoadConcept",
              "DATEncoderSaveConcept", "DATEncoderExportConcept"}


def _load(name, api=False):
    return json.loads((REPO / "workflows" / ("api" if api else "") / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def server(demo_models_folder, tmp_path_factory, comfyui_release):
    base = tmp_path_factory.mktemp("comfyui")
    prepare_base_directory(base, demo_models_folder, photo=None)
    with ComfyUIServer(base, "--extra-model-paths-config", str(base / "extra_model_paths.yaml"),
                       comfyui=comfyui_release) as running:
        yield running


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt of a UI-format workflow, as the editor builds it: linked inputs from ``links``,
    widget values in the order of the node's inputs in /object_info, skipping the editor's extra
    widgets (control_after_generate after a seed, the upload button of an image combo)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        values, inputs = iter(node["widgets_values"]), {}
        for section in ("required", "optional"):
            for name in info["input_order"].get(section, []):
                spec = info["input"][section][name]
                if name in linked:
                    _, origin, slot, target, _, link_type = linked[name]
                    assert target == node["id"] and link_type == spec[0], (node["id"], name)
                    inputs[name] = [str(origin), slot]
                elif isinstance(spec[0], list) or spec[0] in WIDGET_TYPES:
                    inputs[name] = next(values)
                    options = spec[1] if len(spec) > 1 else {}
                    for extra in ("control_after_generate", "image_upload"):
                        if options.get(extra):
                            next(values)
        assert next(values, None) is None, f"node {node['id']} ({node['type']}): more widget values than inputs"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_is_its_api_twin_under_object_info(server, name):
    object_info = server.get("/object_info")
    workflow = _load(name)
    assert {node["type"] for node in workflow["nodes"]} <= set(object_info)
    for node in workflow["nodes"]:  # outputs as /object_info declares them, listing exactly their links
        info = object_info[node["type"]]
        declared = list(zip(info["output_name"], info["output"]))
        # The files are saved by the 0.30.0 editor; an older release may declare fewer outputs (0.3.75's
        # SaveImage has none), which its editor keeps as unlinked slots.
        assert [(o["name"], o["type"]) for o in node["outputs"]][:len(declared)] == declared
        assert not any(o["links"] for o in node["outputs"][len(declared):])
        for slot, output in enumerate(node["outputs"]):
            assert sorted(output["links"]) == sorted(link[0] for link in workflow["links"]
                                                     if link[1] == node["id"] and link[2] == slot)
    assert ui_to_api(workflow, object_info) == _load(name, api=True)


def _boxes(workflow: dict) -> dict[int, tuple[float, float, float, float]]:
    """Each node's box in the editor (x0, y0, x1, y1): its title bar, its body, and room for its text."""
    return {node["id"]: (node["pos"][0], node["pos"][1] - TITLE_HEIGHT, node["pos"][0] + node["size"][0],
                         node["pos"][1] + node["size"][1] + (TEXT_ROOM if node["type"] in TEXT_NODES else 0))
            for node in workflow["nodes"]}


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_has_room_for_every_node_and_its_text(name):
    """No two nodes overlap, also after a run has put its text under a node (two_concepts' Load Concept
    covered Create Solid Mask); the negative prompt is titled as such, as in every example."""
    workflow = _load(name)
    boxes = sorted(_boxes(workflow).items())
    overlaps = [(a, b) for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(boxes) for b, (bx0, by0, bx1, by1) in boxes[i + 1:]
                if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1]
    assert overlaps == []
    negative = [node for node in workflow["nodes"] if node["type"] == "CLIPTextEncode"]
    assert [node.get("title") for node in negative] == ["Negative prompt"] * len(negative)


def test_the_encoder_free_example_needs_only_the_checkpoint_and_a_photo():
    prompt = _load("personalize_without_encoder", api=True)
    assert {node["class_type"] for node in prompt.values()} == {
        "CheckpointLoaderSimple", "LoadImage", "DATEncoderPersonalizeFromWord", "DATEncoderDualPathPatch",
        "DATEncoderApplyConceptToken", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage",
        "DATEncoderSaveConcept"}
    assert [node["inputs"]["ckpt_name"] for node in prompt.values() if node["class_type"] == "CheckpointLoaderSimple"] \
        == ["v1-5-pruned-emaonly.safetensors"]


def _quick(prompt: dict) -> dict:
    """The twin on the demo set at test cost: 2 tuning steps of 1 timestep, 2 sampling steps, 128 px (the
    demo set's VAE is the full SD one: decoding 2 images at 256 px took 39 s on 2 busy CPU cores)."""
    use_demo_models(prompt)
    for node in prompt.values():
        settings = {"DATEncoderPersonalize": {"steps": 2, "timesteps_per_step": 1},
                    "DATEncoderPersonalizeFromWord": {"steps": 2, "timesteps_per_step": 1}, "KSampler": {"steps": 2},
                    "EmptyLatentImage": {"width": 128, "height": 128}}.get(node["class_type"], {})
        node["inputs"].update(settings)
    return prompt


def _images(base, run):
    return [np.asarray(Image.open(base / "output" / image["subfolder"] / image["filename"]))
            for node in run.history["outputs"].values() for image in node.get("images", [])]


def test_api_workflows_personalize_save_then_reuse_and_export(server):
    base = server.base
    texts = []
    prompt = _quick(_load("personalize_and_generate", api=True))
    first = server.run(prompt, on_text=lambda n, t: texts.append((n, t)))
    images = _images(base, first)
    assert len(images) == 2 and all(i.shape == (128, 128, 3) for i in images)
    nearest, note = first.history["outputs"]["5"]["text"][0].splitlines()
    saved = Concept.load(base / "models" / "datencoder_concepts" / "my_concept.safetensors")
    assert nearest == f"nearest word: {saved.token}"
    assert note == "demo encoder (random weights): not a result"  # the demo file's DEMO_KEY says so
    shown = [t.split("  loss")[0] for n, t in texts if n == "5"]  # the loss live, then the word stays on the node
    assert shown == ["step 1/2", "step 2/2", "\n".join([nearest, note]).replace("</w>", "")]
    settings = {k: v for k, v in prompt["5"]["inputs"].items() if not isinstance(v, list)}  # the widgets
    assert saved.tuning == TuningConfig(**settings) and saved.lora_targets == LoRAConfig().targets

    second = server.run(_quick(_load("save_and_reuse_concept", api=True)))
    images = _images(base, second)
    assert len(images) == 2 and all(i.shape == (128, 128, 3) for i in images)
    shown = second.history["outputs"]["2"]["text"][0].splitlines()  # Load Concept: the word, then provenance
    assert shown == [nearest, "tuning: steps=2, lr=0.002, alpha_blend=0.25"]  # two short lines: fits the node
    assert (base / "models" / "loras" / "my_concept.safetensors").is_file()
    assert (base / "models" / "embeddings" / "my_concept.safetensors").is_file()


def _demo_concept(demo_models_folder, word: str, seed: int, vocab: dict) -> Concept:
    """A concept for the demo checkpoint (the demo encoder's sites and fingerprint), random v* and LoRA."""
    encoder, encoder_id = load_encoder(demo_models_folder / "datencoder" / demo_models.ENCODER)
    g = torch.Generator().manual_seed(seed)
    lora = LoRAFactors({s.name: torch.randn(4, s.in_features, generator=g) * 0.1 for s in encoder.sites},
                       {s.name: torch.randn(s.out_features, 4, generator=g) * 0.01 for s in encoder.sites}, 1.0)
    return Concept(torch.randn(encoder.config.token_dim, generator=g) * 0.4, lora, vocab[f"{word}</w>"], f"{word}</w>",
                   architecture_fingerprint(encoder.sites, encoder.config.token_dim), encoder_id, TuningConfig(),
                   LoRAConfig().targets)


def test_api_workflow_two_concepts_in_one_prompt_with_masks(server, demo_models_folder, comfyui_release):
    """Two Load Concept nodes (the names a second photo through the first workflow gives), each through its
    own masked Dual-Path Model Patch, and one prompt with S1* and S2*."""
    vocab = json.loads((comfyui_release / "comfy" / "sd1_tokenizer" / "vocab.json").read_text())
    folder = server.base / "models" / "datencoder_concepts"
    folder.mkdir(parents=True, exist_ok=True)
    for name, word, seed in [("my_concept", "dog", 1), ("my_concept_00001", "backpack", 2)]:
        _demo_concept(demo_models_folder, word, seed, vocab).save(folder / f"{name}.safetensors")
    run = server.run(_quick(_load("two_concepts", api=True)))
    images = _images(server.base, run)
    assert len(images) == 2 and all(i.shape == (128, 128, 3) for i in images)
    shown = [run.history["outputs"][node]["text"][0].splitlines()[0] for node in ("2", "3")]
    assert shown == ["nearest word: dog</w>", "nearest word: backpack</w>"]


def test_api_workflow_personalize_without_encoder(server):
    """The checkpoint and a photo, no clip_vision and no encoder: the concept is tuned from the word's
    embedding, saved, and generates; its record says no encoder made it."""
    run = server.run(_quick(_load("personalize_without_encoder", api=True)))
    images = _images(server.base, run)
    assert len(images) == 2 and all(i.shape == (128, 128, 3) for i in images)
    [record] = run.history["outputs"]["5"]["datencoder"]
    assert len(record["losses"]) == 2 and all(np.isfinite(record["losses"]))
    [saved] = run.history["outputs"]["13"]["datencoder"]
    concept = Concept.load(saved["files"][0])
    assert concept.token == record["token"] and concept.encoder_id == record["encoder_id"]
