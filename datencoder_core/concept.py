"""A personalized concept, its file format, and its export to standard LoRA + embedding files."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .checkpoint import atomic_save, check_fingerprint, read_safetensors
from .errors import DATEncoderError
from .lora import LoRAFactors

CONCEPT_FORMAT = "datencoder.concept"
CONCEPT_FORMAT_VERSION = 1


@dataclass
class Concept:
    """What personalization produces (DESIGN.md): v*, its nearest real token, A/B per canonical site,
    the blend a of Eq. 5, and where it came from (base-model fingerprint, encoder id)."""

    v_star: Tensor  # (D,)
    lora: LoRAFactors  # unbatched: A (r, D_in), B (D_out, r) per site
    token_id: int  # nearest real token of v*: the hard prompt's word
    token: str
    alpha_blend: float
    base_fingerprint: str
    encoder_id: str

    def __post_init__(self):
        if self.v_star.ndim != 1:
            raise DATEncoderError(f"Concept.v_star: expected a (D,) vector, got {tuple(self.v_star.shape)}")
        if set(self.lora.down) != set(self.lora.up) or not self.lora.down:
            raise DATEncoderError("Concept.lora: expected A and B for the same, non-empty set of sites")
        rank = self.rank
        for site, a in self.lora.down.items():
            b = self.lora.up[site]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
                raise DATEncoderError(f"Concept.lora[{site!r}]: expected A (r={rank}, D_in) and B (D_out, r={rank}), "
                                      f"got {tuple(a.shape)} and {tuple(b.shape)}")

    @property
    def rank(self) -> int:
        return next(iter(self.lora.down.values())).shape[0]

    def save(self, path: str | os.PathLike) -> None:
        tensors = {"v_star": self.v_star}
        for site in self.lora.down:
            tensors[f"lora.{site}.down"] = self.lora.down[site]
            tensors[f"lora.{site}.up"] = self.lora.up[site]
        atomic_save(tensors, path, {
            "format": CONCEPT_FORMAT, "format_version": str(CONCEPT_FORMAT_VERSION),
            "token_id": str(self.token_id), "token": self.token, "rank": str(self.rank),
            "scale": repr(self.lora.scale), "alpha_blend": repr(self.alpha_blend),
            "base_fingerprint": self.base_fingerprint, "encoder_id": self.encoder_id,
        })

    @classmethod
    def load(cls, path: str | os.PathLike, expected_fingerprint: str | None = None) -> Concept:
        """Read a concept file; with ``expected_fingerprint``, refuse one made for another base model."""
        tensors, meta = read_safetensors(path, CONCEPT_FORMAT, (CONCEPT_FORMAT_VERSION,))
        if expected_fingerprint is not None:
            check_fingerprint(meta.get("base_fingerprint", ""), expected_fingerprint, path, "concept")
        down, up = {}, {}
        try:
            for key, tensor in tensors.items():
                if key.startswith("lora."):
                    site, kind = key[len("lora."):].rsplit(".", 1)
                    {"down": down, "up": up}[kind][site] = tensor
            return cls(tensors["v_star"], LoRAFactors(down, up, float(meta["scale"])), int(meta["token_id"]),
                       meta["token"], float(meta["alpha_blend"]), meta["base_fingerprint"], meta["encoder_id"])
        except (KeyError, ValueError) as error:
            raise DATEncoderError(f"{path}: damaged concept file ({type(error).__name__}: {error})") from None

    def export(self, lora_path: str | os.PathLike, embedding_path: str | os.PathLike) -> None:
        """Write a kohya-format LoRA (``lora_unet_<diffusers path>.lora_down/lora_up/alpha``; loads in
        ComfyUI, A1111 and diffusers' ``load_lora_weights``) and an A1111/ComfyUI textual-inversion
        embedding (``emb_params``, (1, D)).

        The export drops the dual path: standard tools apply dW to every call and use v* alone, which is
        this concept at alpha_blend = 1.
        """
        lora = {}
        for site, a in self.lora.down.items():
            key = "lora_unet_" + site.replace(".", "_")
            lora[f"{key}.lora_down.weight"] = a
            lora[f"{key}.lora_up.weight"] = self.lora.up[site]
            lora[f"{key}.alpha"] = torch.tensor(self.lora.scale * self.rank)
        note = {"datencoder_note": "exported without the dual path (alpha_blend = 1)", "token": self.token}
        atomic_save(lora, lora_path, note)
        atomic_save({"emb_params": self.v_star[None]}, embedding_path, note)
