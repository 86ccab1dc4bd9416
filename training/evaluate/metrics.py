"""The DreamBench metrics (Ruiz et al. 2023; the paper's Sec. 5.1), from local weight files only.

* DINO: mean pairwise cosine between the DINO ViT-S/16 CLS embeddings of the generated images and of the
  concept's reference photos (every generated x every reference).
* CLIP-I: the same with CLIP image embeddings.
* CLIP-T: mean cosine between each generated image's CLIP image embedding and the CLIP text embedding of
  its prompt with the concept word replaced by the class word.

CLIP is scored with ViT-B-32 and ViT-B-16 (open_clip, OpenAI weights, QuickGELU); papers differ in which
they report, the paper uses ViT-B-16. ``--metrics-models DIR`` holds one file per model (``METRIC_FILES``),
each a state dict (``.safetensors``) of the architecture its ``MetricArchitectures`` entry builds; the
tiny preset builds the same architectures at tiny widths with random weights and writes them to such a
folder, so both run this file-loading code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from datencoder_core import DATEncoderError

METRIC_FILES = {"dino": "dino_vits16.safetensors", "clip_b32": "clip_vit_b32.safetensors",
                "clip_b16": "clip_vit_b16.safetensors"}
CLIP_BACKBONES = {"clip_b32": "ViT-B-32", "clip_b16": "ViT-B-16"}  # how results name them
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _tiny_clip(patch: int) -> dict:
    return {"embed_dim": 16, "quick_gelu": True,
            "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": patch},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@dataclass(frozen=True)
class MetricArchitectures:
    """What each metric file must hold: timm ``VisionTransformer`` kwargs for DINO, open_clip ``CLIP``
    kwargs per CLIP backbone. The defaults are the real models; ``TINY`` is for the tiny preset."""

    dino: dict = field(default_factory=lambda: {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6,
                                                "num_classes": 0})
    clip: dict = field(default_factory=lambda: {
        key: {**open_clip.get_model_config(name), "quick_gelu": True} for key, name in CLIP_BACKBONES.items()})


TINY = MetricArchitectures(dino={"patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 0},
                           clip={"clip_b32": _tiny_clip(32), "clip_b16": _tiny_clip(16)})


def check_metric_files(folder: Path) -> None:
    """Raise ``DATEncoderError`` naming every missing metric file (before any model is loaded)."""
    missing = [name for name in METRIC_FILES.values() if not (Path(folder) / name).is_file()]
    if missing:
        found = sorted(p.name for p in Path(folder).iterdir()) if Path(folder).is_dir() else "no such folder"
        raise DATEncoderError(f"--metrics-models {folder}: missing {missing}; expected {sorted(METRIC_FILES.values())} "
                              f"(found: {found}). README's 'Evaluation' section says how to write them.")


def write_random_metric_models(folder: Path, architectures: MetricArchitectures, seed: int = 0) -> None:
    """Random-weight metric models of ``architectures`` in ``folder`` (the tiny preset)."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(VisionTransformer(**architectures.dino).state_dict(), folder / METRIC_FILES["dino"])
    for key, config in architectures.clip.items():
        state = {k: v.contiguous() for k, v in open_clip.CLIP(**config).state_dict().items()}
        save_file(state, folder / METRIC_FILES[key])


def _load(module: nn.Module, path: Path) -> nn.Module:
    try:
        module.load_state_dict(load_file(path))
    except RuntimeError as error:
        raise DATEncoderError(f"{path}: not the expected architecture ({error})") from None
    return module.eval().requires_grad_(False)


def mean_pairwise_cosine(a: Tensor, b: Tensor) -> float:
    """Mean over all pairs (i, j) of cos(a_i, b_j); ``a`` (N, D), ``b`` (M, D)."""
    return (F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean().item()


def _square(images: Tensor, resize: int, crop: int, mean, std) -> Tensor:
    """(B, H, W, C) in [0, 1] -> (B, C, crop, crop): shorter side to ``resize`` (bicubic), center crop, normalize."""
    pixels = TF.resize(images.permute(0, 3, 1, 2).float(), [resize], InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(TF.center_crop(pixels, [crop]).clamp(0, 1), list(mean), list(std))


class Scorer(Protocol):
    """A further metric ``training.evaluate.run.main`` adds beside DINO and CLIP (the toy world's ground truth):
    ``{name: value}`` for ``generated`` (N, H, W, 3) in [0, 1], made for the concept in ``concept_folder`` (its
    photos and ``concept.json``) with the prompt ``text``."""

    def score(self, generated: Tensor, concept_folder: Path, text: str) -> dict[str, float]: ...


class MetricModels:
    """DINO ViT-S/16 and the CLIP backbones, loaded from ``folder`` (checked with ``check_metric_files``)."""

    def __init__(self, folder: Path, architectures: MetricArchitectures = MetricArchitectures(),
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.dino = _load(VisionTransformer(**architectures.dino), folder / METRIC_FILES["dino"]).to(self.device)
        self.clip = {key: _load(open_clip.CLIP(**config), folder / METRIC_FILES[key]).to(self.device)
                     for key, config in architectures.clip.items()}
        self.tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the BPE vocabulary ships with open_clip

    @torch.no_grad()
    def dino_embeddings(self, images: Tensor) -> Tensor:
        """CLS embeddings (B, D) of ``images`` (B, H, W, C) in [0, 1]: resize 256, crop 224, ImageNet norm."""
        return self.dino(_square(images, 256, 224, IMAGENET_MEAN, IMAGENET_STD).to(self.device))

    @torch.no_grad()
    def clip_image_embeddings(self, key: str, images: Tensor) -> Tensor:
        size = self.clip[key].visual.image_size[0]
        pixels = _square(images, size, size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        return self.clip[key].encode_image(pixels.to(self.device))

    @torch.no_grad()
    def clip_text_embeddings(self, key: str, texts: list[str]) -> Tensor:
        return self.clip[key].encode_text(self.tokenizer(texts).to(self.device))

    def score(self, generated: Tensor, references: list[Tensor], text: str) -> dict[str, float]:
        """DINO, and CLIP-I / CLIP-T per backbone, of ``generated`` (N, H, W, 3) against ``references``
        (photos (H_k, W_k, 3) of any sizes) and the class-word prompt ``text``."""
        refs = [image[None] for image in references]
        scores = {"dino": mean_pairwise_cosine(self.dino_embeddings(generated),
                                               torch.cat([self.dino_embeddings(r) for r in refs]))}
        for key in self.clip:
            image = self.clip_image_embeddings(key, generated)
            scores[f"clip_i_{key[5:]}"] = mean_pairwise_cosine(
                image, torch.cat([self.clip_image_embeddings(key, r) for r in refs]))
            scores[f"clip_t_{key[5:]}"] = mean_pairwise_cosine(image, self.clip_text_embeddings(key, [text]))
        return scores
