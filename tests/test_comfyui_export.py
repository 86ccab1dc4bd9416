"""Export Concept's files in ComfyUI's own loaders: the LoRA through LoraLoader, the embedding through the
``embedding:<name>`` prompt syntax, on the same tiny weights as the Dual-Path Model Patch."""

import pytest
import torch
from training.headless.comfyui import pack_module
from training.headless.random_models import comfy_model_from_diffusers, comfy_noise_prediction, random_comfy_clip

from datencoder_core import Concept, LoRAConfig, LoRAFactors, TuningConfig, architecture_fingerprint

TEXT = "a photo of {} in the snow"


@pytest.fixture
def exported(backend, tmp_path, monkeypatch):
    """A concept with a random LoRA exported into ``loras/`` and ``embeddings/`` folders that ComfyUI's
    ``folder_paths`` serves for this test only; a tiny CLIP that reads embeddings from there."""
    nodes = pack_module("nodes.nodes")  # imports ComfyUI first
    import folder_paths

    g = torch.Generator().manual_seed(11)
    lora = LoRAFactors({s.name: torch.randn(4, s.in_features, generator=g) * 0.1 for s in backend.sites},
                       {s.name: torch.randn(s.out_features, 4, generator=g) * 0.1 for s in backend.sites}, 0.5)
    concept = Concept(torch.randn(32, generator=g), lora, 70, "f</w>", architecture_fingerprint(backend.sites, 32),
                      "enc@test", TuningConfig(), LoRAConfig().targets)
    for folder in ("loras", "embeddings"):
        (tmp_path / folder).mkdir()
        monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(tmp_path / folder)], {".safetensors"}))
    nodes.DATEncoderExportConcept.execute(concept, "my_cat", False)
    return concept, random_comfy_clip(embedding_directory=str(tmp_path / "embeddings"))


def test_exported_lora_and_embedding_equal_the_dual_path_at_alpha_one(tiny_models, exported):
    """LoraLoader + ``embedding:my_cat`` give the UNet output of Dual-Path Model Patch (alpha_blend 1) +
    Apply Concept Token, to float rounding, and differ from the model without the LoRA."""
    import nodes as comfy_nodes

    concept, clip = exported
    patcher = comfy_model_from_diffusers(tiny_models.unet)
    nodes = pack_module("nodes.nodes")
    lora_model, lora_clip = comfy_nodes.LoraLoader().load_lora(patcher, clip, "my_cat.safetensors", 1.0, 1.0)
    assert len(lora_model.patches) == len(concept.lora.down)  # every site's LoRA key was understood
    (embedded,) = comfy_nodes.CLIPTextEncode().encode(lora_clip, TEXT.format("embedding:my_cat"))
    (with_concept,) = nodes.DATEncoderApplyConceptToken.execute(clip, concept, TEXT.format("S*"), "S*").result
    assert torch.allclose(embedded[0][0], with_concept[0][0], atol=1e-6)  # v* landed in the same slot
    dual = pack_module("nodes.patching").patch_model(patcher, concept, 1.0)

    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        before, = comfy_noise_prediction(patcher, [embedded], latents, t)
        [exported_eps] = comfy_noise_prediction(lora_model, [embedded], latents, t)
        [dual_eps] = comfy_noise_prediction(dual, [with_concept], latents, t)
        after, = comfy_noise_prediction(patcher, [embedded], latents, t)
    assert torch.allclose(exported_eps, dual_eps, atol=1e-5), (exported_eps - dual_eps).abs().max()
    assert (exported_eps - before).abs().max() > 1e-3  # the LoRA did load and act
    assert torch.equal(before, after)  # and ComfyUI took it off the shared weights again
