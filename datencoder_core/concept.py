"""A personalized concept, its file format, and its export to standard LoRA + embedding files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .checkpoint import atomic_save, atomic_save_all, read_safetensors
from .config import TuningConfig
from .errors import DATEncoderError
from .lora import LoRAFactors
from .sites import site_target

CONCEPT_FORMAT = "datencoder.concept"
# 2: provenance (the tuning settings and the LoRA targets) instead of alpha_blend, which nothing read.
# Version 1 files still load, with ``tuning`` None.
CONCEPT_FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
NO_ENCODER = "none"  # the encoder_id of a concept tuned from a word's embedding (tuning.personalize_from_word)


@dataclass
class Concept:
    """What personalization produces (DESIGN.md): v*, its nearest real token, A/B per canonical site,
    and where it came from: base-model fingerprint, encoder id, the tuning settings and the encoder's
    LoRA targets (every site is one of them).

    The blend a of Eq. 5 is not part of the concept: it is chosen when sampling (Dual-Path Model Patch);
    ``tuning.alpha_blend`` is only the value the concept was tuned with.
    """

    v_star: Tensor  # (D,)
    lora: LoRAFactors  # unbatched: A (r, D_in), B (D_out, r) per site
    token_id: int  # nearest real token of v*: the hard prompt's word
    token: str
    base_fingerprint: str
    encoder_id: str
    tuning: TuningConfig | None  # the settings of the tuning that made it; None: not recorded (format 1 file)
    lora_targets: tuple[str, ...]  # the encoder's LoRAConfig.targets, e.g. ("attn1.to_q", ...)
    source: str | None = field(default=None, compare=False)  # the file ``load`` read it from; None: made in this run
    # encoder_id NO_ENCODER: the word v* started from (tuning.personalize_from_word), file key "init_word"; else None
    init_word: str | None = None

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
        stray = sorted({site_target(site) for site in self.lora.down} - set(self.lora_targets))
        if stray:
            raise DATEncoderError(f"Concept.lora has sites of the targets {stray}, which lora_targets "
                                  f"{list(self.lora_targets)} does not list")

    @property
    def label(self) -> str:
        """How messages name this concept: its file, or, made in this run, its nearest word and encoder."""
        if self.source is not None:
            return f"the concept {self.source}"
        return f"the concept with nearest word {self.token!r} ({self.origin})"

    @property
    def origin(self) -> str:
        """What made it: ``encoder <id>``, or ``no encoder, tuned from the word '<word>'``."""
        if self.encoder_id == NO_ENCODER:
            return f"no encoder, tuned from the word {self.init_word!r}"
        return f"encoder {self.encoder_id}"

    def non_finite(self) -> list[str]:
        """The names (as in its file) of the tensors that hold NaN or inf; [] for a usable concept."""
        tensors, _ = self.file_contents()
        return [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]

    def check_finite(self) -> None:
        """Refuse, naming this concept and its first bad tensors, a concept with NaN or inf values (a
        diverged tuning or a damaged file): sampling with it would give black or noise images."""
        bad = self.non_finite()
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise DATEncoderError(f"{self.label} holds NaN or inf values (in {shown}); it cannot be used: "
                                  f"make it again (with a lower lr if its tuning diverged)")

    @property
    def rank(self) -> int:
        return next(iter(self.lora.down.values())).shape[0]

    def file_contents(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The tensors and metadata of this concept's file (what ``save`` writes)."""
        tensors = {"v_star": self.v_star}  # first: non_finite names v* before the LoRA
        for site in self.lora.down:
            tensors[f"lora.{site}.down"] = self.lora.down[site]
            tensors[f"lora.{site}.up"] = self.lora.up[site]
        extra = {} if self.init_word is None else {"init_word": self.init_word}
        return tensors, {
            **extra, "format": CONCEPT_FORMAT, "format_version": str(CONCEPT_FORMAT_VERSION),
            "token_id": str(self.token_id), "token": self.token, "rank": str(self.rank),
            "scale": repr(self.lora.scale), "base_fingerprint": self.base_fingerprint, "encoder_id": self.encoder_id,
            "tuning": json.dumps(None if self.tuning is None else self.tuning.to_dict()),
            "lora_targets": json.dumps(list(self.lora_targets)),
        }

    def save(self, path: str | os.PathLike) -> None:
        tensors, metadata = self.file_contents()
        atomic_save(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Concept:
        """Read a concept file (``source`` is ``path``); one with NaN or inf values is refused. Whether it
        suits a model is checked where it is used (``checkpoint.check_base_model``). A format 1 file (no
        provenance) gets ``tuning`` None and the targets its sites show; its ``alpha_blend`` is dropped.
        """
        tensors, meta = read_safetensors(path, CONCEPT_FORMAT, READABLE_VERSIONS)
        down, up = {}, {}
        try:
            for key, tensor in tensors.items():
                if key.startswith("lora."):
                    site, kind = key[len("lora."):].rsplit(".", 1)
                    {"down": down, "up": up}[kind][site] = tensor
            if meta["format_version"] == "1":
                tuning, targets = None, tuple(sorted({site_target(site) for site in down}))
            else:
                recorded = json.loads(meta["tuning"])
                tuning = None if recorded is None else TuningConfig.from_dict(recorded)
                targets = tuple(json.loads(meta["lora_targets"]))
            concept = cls(tensors["v_star"], LoRAFactors(down, up, float(meta["scale"])), int(meta["token_id"]),
                          meta["token"], meta["base_fingerprint"], meta["encoder_id"], tuning, targets,
                          os.fspath(path), meta.get("init_word"))
        except (KeyError, TypeError, ValueError) as error:
            raise DATEncoderError(f"{path}: damaged concept file ({type(error).__name__}: {error})") from None
        concept.check_finite()  # its label names the file
        return concept

    def export_contents(self) -> list[tuple[dict[str, Tensor], dict[str, str]]]:
        """The tensors and metadata of the two files ``export`` writes: [LoRA, embedding]."""
        lora = {}
        for site, a in self.lora.down.items():
            key = "lora_unet_" + site.replace(".", "_")
            lora[f"{key}.lora_down.weight"] = a
            lora[f"{key}.lora_up.weight"] = self.lora.up[site]
            lora[f"{key}.alpha"] = torch.tensor(self.lora.scale * self.rank)
        note = {"datencoder_note": "exported without the dual path (alpha_blend = 1)", "token": self.token}
        return [(lora, note), ({"emb_params": self.v_star[None]}, note)]

    def export(self, lora_path: str | os.PathLike, embedding_path: str | os.PathLike) -> None:
        """Write a kohya-format LoRA (``lora_unet_<diffusers path>.lora_down/lora_up/alpha``; loads in
        ComfyUI, A1111 and diffusers' ``load_lora_weights``) and an A1111/ComfyUI textual-inversion
        embedding (``emb_params``, (1, D)), both or neither (``atomic_save_all``).

        The export drops the dual path: standard tools apply dW to every call and use v* alone, which is
        this concept at alpha_blend = 1.
        """
        (lora, note), (embedding, _) = self.export_contents()
        atomic_save_all([(lora, lora_path, note), (embedding, embedding_path, note)])
