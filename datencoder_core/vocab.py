"""Nearest real tokens of a soft embedding, over the text encoder's token-embedding table."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DATEncoderError


@torch.no_grad()
def nearest_tokens(v_star: Tensor, vocab: Tensor, k: int = 1, exclude: Sequence[int] = ()) -> Tensor:
    """Ids of the ``k`` vocabulary rows nearest to each v* by cosine similarity: (B, k), best first.

    ``v_star`` is (B, D), ``vocab`` (V, D) (49,408 x 768 for SD1.x); the search is one matmul.
    ``exclude`` lists ids never returned (the start/end-of-text tokens).
    """
    if v_star.ndim != 2 or vocab.ndim != 2 or v_star.shape[1] != vocab.shape[1]:
        raise DATEncoderError(f"nearest_tokens: expected v* (B, D) and vocab (V, D) with the same D, "
                              f"got {tuple(v_star.shape)} and {tuple(vocab.shape)}")
    similarity = F.normalize(v_star.float(), dim=-1) @ F.normalize(vocab.float(), dim=-1).T  # (B, V)
    if exclude:
        similarity[:, list(exclude)] = -torch.inf
    return similarity.topk(k, dim=-1).indices
