"""The encoder, its heads, the LoRA sites and the CLIP feature contract."""

import torch
from diffusers import UNet2DConditionModel

from datencoder_core import DATEncoder, EncoderConfig, LoRAConfig, architecture_fingerprint, discover_sites


def _sd15_sites(lora_config=LoRAConfig()):
    with torch.device("meta"):  # SD1.5 shapes without allocating SD1.5
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    return discover_sites(unet.named_modules(), lora_config.targets)


def test_sd15_has_the_papers_96_matrices():
    sites = _sd15_sites()
    assert len(sites) == 96
    mean_parameters = sum(s.in_features * s.out_features for s in sites) / len(sites)
    assert round(mean_parameters) == 715_947  # the paper: "an average of 715,946 parameters"
    assert sites[0].name == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert {(s.in_features, s.out_features) for s in sites if s.name.endswith("attn2.to_k")} == {
        (768, 320), (768, 640), (768, 1280)}


def test_parameter_counts_for_sd15_are_as_documented():
    with torch.device("meta"):
        encoder = DATEncoder(EncoderConfig(), LoRAConfig(), _sd15_sites())
    assert sum(p.numel() for p in encoder.hyper_head.parameters()) == 5_823_488  # hypernet.py's docstring
    assert sum(p.numel() for p in encoder.parameters()) == 23_665_920


def test_fewer_targets_give_fewer_sites():
    assert len(_sd15_sites(LoRAConfig(targets=("attn2.to_k", "attn2.to_v")))) == 32


def test_fingerprint_tells_architectures_apart(tiny_models, backend):
    tiny = architecture_fingerprint(backend.sites, 32)
    assert tiny == architecture_fingerprint(discover_sites(tiny_models.unet.named_modules(), LoRAConfig().targets), 32)
    assert tiny != architecture_fingerprint(_sd15_sites(), 768)


def test_encoder_shapes_and_zero_initial_offsets(tiny_models, backend, encoder):
    clip_tokens = torch.randn(3, 1 + 16 * 16, 32)
    unet_features = torch.randn(3, 64, 2, 2)
    out = encoder(clip_tokens, unet_features)
    assert out.v_star.shape == (3, 32)
    for site in backend.sites:
        assert out.lora.down[site.name].shape == (3, 4, site.in_features)
        assert out.lora.up[site.name].shape == (3, site.out_features, 4)
        assert torch.count_nonzero(out.lora.up[site.name]) == 0  # B heads start at zero: dW = 0
    assert torch.count_nonzero(out.lora.squared_norms()) == 0


def test_encoder_trains_both_heads():
    """One optimiser step on a loss through v* and dW changes both heads' outputs."""
    sites = discover_sites(UNet2DConditionModel(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32,
                                                attention_head_dim=8).named_modules(), LoRAConfig().targets)
    config = EncoderConfig(clip_dim=32, unet_dim=64, token_dim=32, trunk_channels=128, feature_dim=64,
                           hyper_bottleneck=16)
    enc = DATEncoder(config, LoRAConfig(), sites)
    inputs = torch.randn(2, 1 + 9, 32), torch.randn(2, 64, 4, 4)
    out = enc(*inputs)
    target = torch.ones_like(out.v_star)
    loss = (out.v_star - target).pow(2).mean() - out.lora.squared_norms().mean() - sum(
        (u.sum() for u in out.lora.up.values()))
    loss.backward()
    torch.optim.SGD(enc.parameters(), lr=0.1).step()
    after = enc(*inputs)
    assert (after.v_star - target).pow(2).mean() < (out.v_star - target).pow(2).mean()
    assert torch.count_nonzero(after.lora.squared_norms()) == 2


def test_clip_tokens_are_taken_before_the_final_layer_norm(tiny_models, backend, cat_image):
    """Feature contract: our tokens, through open_clip's ln_post, are open_clip's own output tokens."""
    ours = backend._clip_tokens(cat_image)
    tower = tiny_models.vision_tower
    from datencoder_core.images import clip_preprocess

    tower.output_tokens = True
    try:
        _, theirs = tower(clip_preprocess(cat_image))
    finally:
        tower.output_tokens = False
    assert ours.shape == (1, 1 + 16 * 16, 32)
    assert torch.allclose(tower.ln_post(ours)[:, 1:], theirs, atol=1e-5)
    assert not torch.allclose(ours[:, 1:], theirs, atol=1e-2)
