"""Build the reference model stack: SD1.x UNet + VAE + text encoder, CLIP ViT-H-14 vision tower.

Two shapes, one structure, random weights (nothing is ever downloaded):
* ``tiny``: SD1.5's structure (4 UNet levels, 16 transformer blocks, 96 LoRA sites) at small widths;
  seconds on a CPU. The tests use it.
* ``sd15``: SD1.5 / ViT-H-14 shapes, for the benchmark.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.tokenizer import bytes_to_unicode
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from datencoder_core import DATEncoder, EncoderConfig, LoRAConfig, discover_sites
from datencoder_core.reference import DiffusersReferenceBackend

# trunk 128: 4 channels in each of the trunk's 32 GroupNorm groups, the fewest EncoderConfig accepts.
TINY_ENCODER = EncoderConfig(clip_dim=32, unet_dim=64, token_dim=32, trunk_channels=128, trunk_blocks=1,
                             feature_dim=64, hyper_bottleneck=16)


@dataclass
class ReferenceModels:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    vision_tower: nn.Module
    alphas_cumprod: torch.Tensor
    image_size: int  # pixels the VAE sees
    encoder_config: EncoderConfig  # encoder shapes that fit these models

    def backend(self, lora_config: LoRAConfig = LoRAConfig()) -> DiffusersReferenceBackend:
        return DiffusersReferenceBackend(self.unet, self.vae, self.text_encoder, self.tokenizer, self.vision_tower,
                                         self.alphas_cumprod, lora_config, self.image_size)

    def random_encoder(self, lora_config: LoRAConfig = LoRAConfig(), seed: int = 0) -> DATEncoder:
        torch.manual_seed(seed)
        sites = discover_sites(self.unet.named_modules(), lora_config.targets)
        return DATEncoder(self.encoder_config, lora_config, sites).to(self.unet.device)

    def to(self, device, dtype: torch.dtype | None = None) -> ReferenceModels:
        """Move the frozen models; ``dtype`` (float16/bfloat16) halves their memory. Trainable tensors
        (v*, A, B) and the encoder stay float32."""
        for module in (self.unet, self.vae, self.text_encoder, self.vision_tower):
            module.to(device) if dtype is None else module.to(device, dtype)
        return self


def sd15_alphas_cumprod() -> torch.Tensor:
    """SD1.x's training schedule: scaled-linear betas from 0.00085 to 0.012 over 1000 steps."""
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod


def byte_level_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer with no merges: one token per character (514 tokens). Made in code, offline."""
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"))


def _text_encoder(tokenizer: CLIPTokenizer, vocab_size: int, **shape) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **shape)
    return CLIPTextModel(config).eval()


def build_random_models(shapes: str = "tiny", seed: int = 0) -> ReferenceModels:
    """Random-weight models with SD1.5's structure; ``shapes`` is "tiny" or "sd15" (full size)."""
    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    if shapes == "tiny":
        unet = UNet2DConditionModel(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32,
                                    attention_head_dim=8, sample_size=16)
        vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                            sample_size=128)
        text_encoder = _text_encoder(tokenizer, len(tokenizer), hidden_size=32, intermediate_size=37,
                                     num_hidden_layers=2, num_attention_heads=4)
        vision_cfg = CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=14, image_size=224)
        vision_tower, image_size, encoder_config = _build_vision_tower(32, vision_cfg), 128, TINY_ENCODER
    elif shapes == "sd15":
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=512)
        text_encoder = _text_encoder(tokenizer, 49408, hidden_size=768, intermediate_size=3072,
                                     num_hidden_layers=12, num_attention_heads=12)
        config = open_clip.get_model_config("ViT-H-14")
        vision_tower = _build_vision_tower(config["embed_dim"], CLIPVisionCfg(**config["vision_cfg"]))
        image_size, encoder_config = 512, EncoderConfig()
    else:
        raise ValueError(f"shapes must be 'tiny' or 'sd15', got {shapes!r}")
    return ReferenceModels(unet.eval(), vae.eval(), text_encoder, tokenizer, vision_tower.eval(),
                           sd15_alphas_cumprod(), image_size, encoder_config)
