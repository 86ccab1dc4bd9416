"""Training objectives: Eq. 1 (diffusion), Eq. 3 (nearest-neighbour contrastive), Eq. 4 (L2 on v*).

The L2 on the weight offsets (Sec. 4.1) is ``LoRAFactors.squared_norms``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import SIMILARITIES
from .vocab import nearest_tokens


def diffusion_loss(noise_pred: Tensor, noise: Tensor) -> Tensor:
    """Eq. 1: E ||eps - eps_theta(z_t, t, y)||^2, as the mean over all elements."""
    return F.mse_loss(noise_pred.float(), noise.float())


def nearest_neighbor_contrastive_loss(v_star: Tensor, vocab: Tensor, *, k: int, temperature: float,
                                      exclude: Sequence[int], similarity: str = "cosine") -> Tensor:
    """Eq. 3, averaged over the batch:

        L_c(v*) = -log( sum_{T in N(v*)} e^{s(v*,T)/tau} / (sum_{T in N(v*)} e^{s(v*,T)/tau} + sum_{v' != v*} e^{s(v*,v')/tau}) )

    N(v*) is the ``k`` nearest rows of ``vocab`` (V, D) by cosine, never the ids in ``exclude``: pass the
    start/end-of-text tokens (``backend.special_token_ids``), which tuning never picks as a concept's word
    either. The positives are constants: the gradient reaches v* only, never ``vocab`` (the text
    encoder's token table, which may be a parameter). s is ``similarity``: "cosine" (bounded logits; Eq. 4
    controls the norm separately) or "dot", the paper's v* . T, whose logits grow with the norms.
    The negatives of each row of ``v_star`` (B, D) are its other rows (multi-process pretraining passes
    the all-gathered batch as ``v_star``, see ``training/pretrain/objective.py``).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    positives = vocab.detach()[nearest_tokens(v_star, vocab, k, exclude)]  # (B, k, D)
    v = v_star
    if similarity == "cosine":
        v, positives = F.normalize(v_star, dim=-1), F.normalize(positives, dim=-1)
    pos_logits = torch.einsum("bd,bkd->bk", v, positives) / temperature
    self_mask = torch.eye(v.shape[0], dtype=torch.bool, device=v.device)  # a row is not its own negative
    neg_logits = (v @ v.T / temperature).masked_fill(self_mask, -torch.inf)  # (B, B)
    return (torch.cat([pos_logits, neg_logits], 1).logsumexp(1) - pos_logits.logsumexp(1)).mean()


def embedding_l2_loss(v_star: Tensor) -> Tensor:
    """Eq. 4: ||v*||^2, averaged over the batch."""
    return v_star.pow(2).sum(-1).mean()
