"""What the core needs from a host model stack (the diffusers reference, or ComfyUI).

A backend owns an SD1.x UNet, VAE, text encoder and a CLIP ViT-H-14 vision tower, and exposes them in
the core's terms. Implementations: ``reference.DiffusersReferenceBackend`` here, the ComfyUI backend in
``nodes/``. The tuning loop, the losses and the concept file only ever talk to this protocol.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from .attention import DualPathState
from .prompts import PromptIds
from .sites import LoRASite


class PersonalizationBackend(Protocol):
    sites: tuple[LoRASite, ...]  # the LoRA targets, canonical names
    token_embeddings: Tensor  # (V, D) the text encoder's token-embedding table
    special_token_ids: tuple[int, ...]  # never chosen as a nearest token (start/end of text)
    alphas_cumprod: Tensor  # (1000,) the training noise schedule
    device: object

    def encode_latents(self, images: Tensor) -> Tensor:
        """IMAGE (B, H, W, C) in [0, 1] -> scaled VAE latents (B, 4, h, w), deterministic (the mean)."""

    def image_features(self, images: Tensor, noisy_latents: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's inputs (see ``encoder.py``): CLIP tokens (B, 1 + g*g, C) before the final
        LayerNorm, and the UNet mid-block output (B, C', h, w) on ``noisy_latents`` with an empty prompt."""

    def prompt_ids(self, template: str) -> PromptIds:
        """``template`` tokenized once, by ``prompts.prompt_ids`` with this backend's tokenizer."""

    def encode_prompt(self, prompt: str | PromptIds, token_id: int, embedding: Tensor | None = None) -> Tensor:
        """Text context (1, S, D) of ``prompt`` (a template, or its ``prompt_ids``), whose slot holds the
        one token ``token_id``, or, when ``embedding`` (D,) is given, that soft embedding
        (differentiable) in the slot's place."""

    def decode_token(self, token_id: int) -> str:
        """The vocabulary string of a token id."""

    def word_token_ids(self, word: str) -> list[int]:
        """The token ids ``word`` (a word or a few) tokenizes to, without the start and end tokens; [] for
        an empty or blank ``word``. ``tuning.word_start`` averages their embeddings."""

    def predict_noise(self, noisy_latents: Tensor, timesteps: Tensor, context: Tensor,
                      dual_path: DualPathState) -> Tensor:
        """eps prediction (B, 4, h, w) of the UNet with the dual path of Eq. 5 on every attention module."""
