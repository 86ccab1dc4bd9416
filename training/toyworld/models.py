"""The toy world's "SD1.5": a VAE, a CLIP text encoder and a text-to-image UNet with SD1.x's structure at
tiny shapes, trained from scratch on the world (``training.toyworld.world``) on a CPU, plus a random-frozen
open_clip vision tower; and the loader that makes them ``training.models.reference.ReferenceModels``.

Files in a world folder (what ``python -m training.pretrain --base DIR/sd --clip-vision DIR/clip_vision.safetensors``
and ``training.evaluate`` read, through ``training.models.loading``):
* ``sd/``: a diffusers ``StableDiffusionPipeline`` folder (unet, vae, text_encoder, tokenizer, scheduler);
  the tokenizer is SD1.x's own (``training/models/configs/sd15/tokenizer``), the scheduler SD1.x's.
* ``clip_vision.safetensors``: the vision tower in open_clip's keys (``visual.*``), the world's CLIP image
  tower (``train_vision_tower``).
* ``sd/world.json``: ``WorldShapes`` (the loader's contract: the pixel size and the vision tower's shape).

Training (``train_world_models``): the vision tower on naming every attribute of a scene; the VAE on
reconstruction (MSE + a small KL, as SD's KL-f8 minus the GAN and perceptual terms), its latent scale set
to 1/std of the latents (SD's ``scaling_factor``); then the text encoder and the UNet together on Eq. 1's
eps-prediction loss at SD1.x's noise schedule, over captions of which a tenth are empty, so classifier-free
guidance works. Two standard speed-ups make a few thousand CPU steps enough: Min-SNR-5 loss weighting (Hang
et al., 2023) and an exponential moving average of the weights (diffusers' ``EMAModel``), which is what is
saved. Last, ``forget_unused_words`` zeroes the embedding of every token no caption contains (module
docstring of that function).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from datencoder_core import DATEncoderError, EncoderConfig
from datencoder_core.reference import open_clip_tokens
from training.models.loading import LOADER_FILE, SD15_CONFIG, load_vision_tower
from training.models.reference import ReferenceModels, sd15_alphas_cumprod
from training.toyworld import world
from training.toyworld.truth import Renders, fit_attributes

log = logging.getLogger(__name__)
SD15_TOKENIZER = SD15_CONFIG / "tokenizer"
SHAPES_FILE = "world.json"


@dataclass(frozen=True)
class WorldShapes:
    """Model widths of the world; SD1.x's structure (UNet cross-attention down/up blocks, KL VAE, CLIP)."""

    image_size: int = world.SIZE
    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels: 32 px -> 8x8x4 latents
    unet_channels: tuple[int, ...] = (32, 64)
    text_width: int = 64  # v6: 32 wide and 2 deep drew a named appearance's colours worse after 1,500 steps
    text_layers: int = 3
    vision_width: int = 32
    vision_layers: int = 2
    vision_patch: int = 4  # 8x8 CLIP tokens at 32 px

    def vision_model(self) -> dict:
        """open_clip's model-config shape for ``training.models.loading.load_vision_tower``."""
        return {"embed_dim": self.text_width, "vision_cfg": {"layers": self.vision_layers, "width": self.vision_width,
                                                             "head_width": 16, "patch_size": self.vision_patch,
                                                             "image_size": self.image_size}}

    def encoder_config(self) -> EncoderConfig:
        """Encoder shapes for these models. The trunk keeps several channels in each of its 32 GroupNorm groups
        (4; SD1.5's default trunk has 16): with one channel per group the norm is per channel, and the global mean
        after it cancels each channel's level over the image, which is what a colour is. At 32 channels a random
        encoder's pooled feature names a scene's body colour no better than chance; at 128, as well as its CLIP
        input does (tests/test_toyworld.py)."""
        return EncoderConfig(clip_dim=self.vision_width, unet_dim=self.unet_channels[-1], token_dim=self.text_width,
                             trunk_channels=128, trunk_blocks=1, feature_dim=64, hyper_bottleneck=16)


@dataclass(frozen=True)
class WorldBudget:
    """How long the world's models train (``full``: the report's world; ``reduced``: the test's)."""

    images: int = 6000
    vae_steps: int = 1000
    unet_steps: int = 6000
    batch_size: int = 32
    unet_lr: float = 1e-3  # peak, after a 5% warm-up, cosine decay
    ema_decay: float = 0.998
    vision_steps: int = 3000
    seed: int = 0


def build_models(shapes: WorldShapes, seed: int) -> ReferenceModels:
    """Random-initialised world models."""
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(SD15_TOKENIZER, local_files_only=True)
    levels = len(shapes.vae_channels)
    vae = AutoencoderKL(block_out_channels=shapes.vae_channels, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, sample_size=shapes.image_size)
    blocks = len(shapes.unet_channels)
    unet = UNet2DConditionModel(sample_size=shapes.image_size // 2 ** (levels - 1), block_out_channels=shapes.unet_channels,
                                down_block_types=("CrossAttnDownBlock2D",) * blocks,
                                up_block_types=("CrossAttnUpBlock2D",) * blocks, layers_per_block=1,
                                cross_attention_dim=shapes.text_width, attention_head_dim=8,
                                norm_num_groups=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=shapes.text_width, intermediate_size=4 * shapes.text_width,
        num_hidden_layers=shapes.text_layers, num_attention_heads=4, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vision = shapes.vision_model()
    tower = _build_vision_tower(vision["embed_dim"], CLIPVisionCfg(**vision["vision_cfg"]))
    return ReferenceModels(unet, vae, text_encoder, tokenizer, tower.eval(), sd15_alphas_cumprod(), shapes.image_size,
                           shapes.encoder_config())


def train_vision_tower(tower: nn.Module, data: Renders, test: Renders, budget: WorldBudget) -> dict[str, float]:
    """Train the world's CLIP image tower to name every attribute of a scene (``world.ATTRIBUTES``: shape,
    context, body colour, stripe colour), one linear head each on the mean of its final patch tokens
    (after ``ln_post``); the heads are then dropped. Returns the held-out accuracy per attribute on ``test``.

    Why trained: CLIP ViT-H-14 learnt from web captions that name colours and patterns, so its tokens tell
    appearances apart; the world's captions name them only some of the time, and never a concept's. A random
    tower keeps them poorly (v5's world: a linear probe on its pooled tokens named the body colour of 45% of
    held-out scenes, chance 17%; trained, 88%)."""
    return fit_attributes(_AttributeProbe(tower), data, test, budget.vision_steps, 2 * budget.batch_size,
                          budget.seed + 2, "world vision tower")


class _AttributeProbe(nn.Module):
    """An open_clip tower with a linear head per attribute on the mean of its final patch tokens (after ``ln_post``)."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower
        self.heads = nn.ModuleDict({name: nn.Linear(tower.ln_post.normalized_shape[0], len(values))
                                    for name, values in world.ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.tower.ln_post(open_clip_tokens(self.tower, images)[:, 1:]).mean(1)
        return {name: head(pooled) for name, head in self.heads.items()}


def train_vae(vae: AutoencoderKL, images: np.ndarray, budget: WorldBudget) -> None:
    """Reconstruction + 1e-6 KL; then ``scaling_factor`` = 1 / std of the latent means."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1  # (N, 3, S, S) in [-1, 1]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(budget.seed)
    vae.train()
    for _ in (bar := tqdm(range(budget.vae_steps), desc="world VAE", unit="step")):
        batch = pixels[torch.randint(len(pixels), (budget.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample(generator)).sample, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels[:2048].split(256)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))


def train_text_to_image(models: ReferenceModels, images: np.ndarray, captions: list[str], budget: WorldBudget) -> None:
    """The text encoder and UNet together on the eps-prediction loss (Eq. 1) weighted by min(SNR, 5) / SNR,
    latents precomputed; both end as the exponential moving average of their weights."""
    vae, unet, text_encoder = models.vae, models.unet, models.text_encoder
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
        latents = torch.cat([vae.encode(c).latent_dist.mean for c in pixels.split(256)]) * vae.config.scaling_factor
    ids = models.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    alphas = models.alphas_cumprod
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=budget.unet_lr, weight_decay=1e-2)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=budget.unet_steps // 20,
                             num_training_steps=budget.unet_steps)
    ema = EMAModel(parameters, decay=budget.ema_decay)
    generator = torch.Generator().manual_seed(budget.seed + 1)
    unet.train(), text_encoder.train()
    for _ in (bar := tqdm(range(budget.unet_steps), desc="world UNet + text encoder", unit="step")):
        rows = torch.randint(len(latents), (budget.batch_size,), generator=generator)
        t = torch.randint(len(alphas), (budget.batch_size,), generator=generator)
        noise = torch.randn(latents[rows].shape, generator=generator)
        abar = alphas[t].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents[rows] + (1 - abar).sqrt() * noise
        context = text_encoder(ids[rows]).last_hidden_state
        snr = abar.flatten() / (1 - abar.flatten())
        errors = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise, reduction="none")
        loss = (errors.mean((1, 2, 3)) * snr.clamp(max=5) / snr).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(parameters)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(parameters)
    unet.eval(), text_encoder.eval()


def world_token_ids(tokenizer: CLIPTokenizer) -> list[int]:
    """The ids of every token a world caption can contain, start and end of text included."""
    return sorted(set(tokenizer(" ".join(world.caption_words())).input_ids))


@torch.no_grad()
def forget_unused_words(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> None:
    """Zero the token embedding of every word the world's captions never use.

    SD1.5's text encoder was trained on every token of its vocabulary, so the nearest token of a v* (Eq. 3's
    positives, Eq. 5's hard path) is always a word with a meaning. The world's captions use about 25 words; the
    other 49,000 rows are random initialisations that no caption ever trained, and a v* would land on one of them
    (a nonsense word in the hard path). Zeroed rows have cosine 0 to every v*, so the search lands on a world
    word wherever any has a positive cosine. No caption contains them, so no caption's encoding changes."""
    embedding = text_encoder.get_input_embeddings().weight
    unused = torch.ones(len(embedding), dtype=torch.bool)
    unused[world_token_ids(tokenizer)] = False
    embedding[unused] = 0


def train_world_models(folder: Path, shapes: WorldShapes, budget: WorldBudget) -> dict[str, float]:
    """Build, train and write the world's models into ``folder`` (``sd/`` and ``clip_vision.safetensors``);
    returns the vision tower's held-out accuracy per attribute."""
    models = build_models(shapes, budget.seed)
    images, scenes, captions = world.render_dataset(budget.images, budget.seed)
    vision_accuracy = train_vision_tower(models.vision_tower, (images, scenes),
                                         world.render_dataset(1000, budget.seed + 9)[:2], budget)
    train_vae(models.vae, images, budget)
    train_text_to_image(models, images, captions, budget)
    forget_unused_words(models.text_encoder, models.tokenizer)
    pipeline = StableDiffusionPipeline(models.vae, models.text_encoder, models.tokenizer, models.unet,
                                       DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                     clip_sample=False, set_alpha_to_one=False, steps_offset=1),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder / "sd")
    (folder / "sd" / SHAPES_FILE).write_text(json.dumps(dataclasses.asdict(shapes), indent=2))
    (folder / "sd" / LOADER_FILE).write_text(json.dumps({"loader": f"{__name__}:{load_world_models.__name__}"}))
    save_file({f"visual.{k}": v.contiguous() for k, v in models.vision_tower.state_dict().items()},
              folder / "clip_vision.safetensors")
    return vision_accuracy


def load_world_models(base: Path, clip_vision: Path, *, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> ReferenceModels:
    """The world's frozen models from ``base`` (its ``sd/`` folder) and ``clip_vision``, as ``load_reference_models``
    gives SD1.5's; ``training.models.loading`` calls it for the folder, which names it in its ``loader.json``."""
    base = Path(base)
    try:
        raw = json.loads((base / SHAPES_FILE).read_text())
        shapes = WorldShapes(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    except (ValueError, TypeError) as error:
        raise DATEncoderError(f"{base / SHAPES_FILE}: not a toy world's shapes file ({error}); rebuild the world "
                              f"with python -m training.toyworld") from None
    options = {"torch_dtype": dtype, "local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(base / "unet", **options)
    vae = AutoencoderKL.from_pretrained(base / "vae", **options)
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", **options)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer", local_files_only=True)
    tower = load_vision_tower(clip_vision, vision_model=shapes.vision_model()).to(dtype)
    models = ReferenceModels(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer, tower, sd15_alphas_cumprod(),
                             shapes.image_size, shapes.encoder_config())
    return models.to(device)
