"""Feature contract: ComfyUI's CLIP-vision ``last_hidden_state`` is open_clip's ViT-H-14 tokens before
``ln_post``, for the same random weights loaded into both (through ComfyUI's own key conversion)."""

import open_clip
import torch
from training.headless.comfyui import import_comfyui
from open_clip.model import CLIPVisionCfg, _build_vision_tower

from datencoder_core.reference import open_clip_tokens


def test_comfyui_clip_vision_gives_open_clip_tokens_before_ln_post(cat_image, monkeypatch):
    import_comfyui()
    import comfy.cli_args
    import comfy.clip_vision

    monkeypatch.setattr(comfy.cli_args.args, "fp32_text_enc", True)  # compare in float32, as open_clip runs
    torch.manual_seed(0)
    config = open_clip.get_model_config("ViT-H-14")
    tower = _build_vision_tower(config["embed_dim"], CLIPVisionCfg(**config["vision_cfg"])).eval()
    state = {f"visual.{k}": v.clone() for k, v in tower.state_dict().items()}
    clip_vision = comfy.clip_vision.load_clipvision_from_sd(state, prefix="visual.", convert_keys=True)
    with torch.no_grad():
        ours = open_clip_tokens(tower, cat_image)
        theirs = clip_vision.encode_image(cat_image)["last_hidden_state"]
        after_ln_post = tower.ln_post(ours)
    assert ours.shape == theirs.shape == (1, 1 + 16 * 16, 1280)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4
    assert ((after_ln_post - theirs).abs().max() / theirs.abs().max()).item() > 1e-2  # and not after it
