"""The pretraining objective: one function from a batch to the named loss terms (Sec. 4.1-4.3).

Every row of the batch is its own concept: its own v*, LoRA factors, nearest token, prompt template,
timestep and noise. For a row with image I, latent z_0, timestep t and noise eps:

    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,   (v*, A, B) = E(CLIP(I), UNet_mid(z_t, t))
    L = ||eps - eps_theta(z_t, t, C(v*), C_h; W + dW, a)||^2       Eq. 1 with the dual path of Eq. 5
        + w_c L_c(v*)  + w_e ||v*||^2  + w_W sum_l ||dW_l||_F^2     Eq. 3, Eq. 4, Sec. 4.1

The forward up to eps_theta is ``datencoder_core.forward.encoder_forward``, the one that validation and
personalization run.

The embedding regularization is an ablation switch (paper Fig. 4): ``none`` drops Eq. 3 and 4,
``l2`` keeps Eq. 4, ``nearest`` replaces Eq. 3 by the cosine distance to the nearest token (VQGAN's
code-book loss), ``contrastive`` is the paper's. ``dual_path = False`` runs the soft path alone (a = 1);
``hypernetwork = False`` keeps dW = 0 and drops its L2.

Eq. 3's negatives are the whole global batch. Each process gathers every process's v* (no gradient),
puts its own rows back as live tensors, and evaluates Eq. 3 over all N rows; the gradient reaching a
local row is then exactly dL_c/dv* of the global loss (as anchor and as the others' negative). DDP
averages gradients over the W processes, so that term is scaled by W in the objective; the per-row
terms are local means, which DDP's average turns into global means. Hence W processes with N/W rows
each take the same step as one process with N rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from datencoder_core.encoder import DATEncoder
from datencoder_core.forward import encoder_forward, noised_features
from datencoder_core.losses import diffusion_loss, embedding_l2_loss, nearest_neighbor_contrastive_loss
from datencoder_core.reference import DiffusersReferenceBackend
from datencoder_core.vocab import nearest_tokens

from training.data.sources import sample_seed
from training.pretrain.config import PretrainConfig

Gather = Callable[[Tensor], Tensor]  # (b, D) on every process -> (W*b, D), rank order, no gradient


@dataclass
class Draws:
    """Per-row randomness, a function of (seed, sample position) only."""

    timesteps: Tensor  # (b,)
    noise: Tensor  # (b, 4, h, w)
    templates: list[int]


def draw(positions: Tensor, latent_shape: tuple[int, ...], seed: int, num_templates: int, num_timesteps: int) -> Draws:
    timesteps, noise, templates = [], [], []
    for position in positions.tolist():
        generator = torch.Generator().manual_seed(sample_seed(seed, position, 1))
        timesteps.append(int(torch.randint(num_timesteps, (), generator=generator)))
        templates.append(int(torch.randint(num_templates, (), generator=generator)))
        noise.append(torch.randn(latent_shape, generator=generator))
    return Draws(torch.tensor(timesteps), torch.stack(noise), templates)


@dataclass
class LossOutput:
    objective: Tensor  # what this process back-propagates (see the module docstring for the W factor)
    terms: dict[str, Tensor]  # each term's value (the global one for Eq. 3), detached, and "loss", their sum
    metrics: dict[str, Tensor]  # nearest-token statistics of the global batch


class PretrainingObjective:
    def __init__(self, backend: DiffusersReferenceBackend, config: PretrainConfig):
        self.backend, self.config, self.training = backend, config, config.training
        self.vocab = backend.token_embeddings.detach().float()  # (V, D), cast once
        self.prompts = [backend.prompt_ids(template) for template in self.training.templates]
        self.alpha = self.training.alpha_blend if self.training.dual_path else 1.0

    @torch.no_grad()
    def _latents_and_draws(self, images: Tensor, positions: Tensor,
                           latents: Tensor | None = None) -> tuple[Tensor, Draws]:
        """The batch's latents (b, 4, h, w) and its rows' draws. ``latents``: the images' latents from the
        latent cache (``training.cache_latents``); None: encoded here."""
        backend = self.backend
        latents = backend.encode_latents(images) if latents is None else latents.to(backend.device, backend.vae.dtype)
        draws = draw(positions, tuple(latents.shape[1:]), self.training.seed, len(self.prompts),
                     len(backend.alphas_cumprod))
        return latents, draws

    def encoder_inputs(self, images: Tensor, positions: Tensor,
                       latents: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Draws]:
        """The frozen half of ``__call__``'s forward (``forward.noised_features``): noisy latents
        (b, 4, h, w), CLIP tokens and UNet mid features at them, and the draws."""
        latents, draws = self._latents_and_draws(images, positions, latents)
        return (*noised_features(self.backend, images, latents, draws.noise, draws.timesteps), draws)

    def __call__(self, encoder: DATEncoder, images: Tensor, positions: Tensor, gather: Gather, rank: int,
                 world: int, latents: Tensor | None = None) -> LossOutput:
        backend, loss_config, training = self.backend, self.config.loss, self.training
        latents, draws = self._latents_and_draws(images, positions, latents)
        forward = encoder_forward(backend, encoder, images, latents, draws.noise, draws.timesteps,
                                  [self.prompts[i] for i in draws.templates], self.alpha)
        out, noise_pred = forward.prediction, forward.noise_pred
        v_star = out.v_star  # (b, D) float32
        terms = {"diffusion": diffusion_loss(noise_pred, draws.noise.to(noise_pred.device))}
        weighted = {"diffusion": terms["diffusion"]}

        everyone = _with_live_rows(gather(v_star.detach()), v_star, rank)  # (N, D), local rows live
        regularization = training.embedding_regularization
        if regularization != "none":
            terms["embedding_l2"] = embedding_l2_loss(v_star)
            weighted["embedding_l2"] = loss_config.embedding_l2_weight * terms["embedding_l2"]
        if regularization == "nearest":
            nearest = self.vocab[torch.tensor(forward.token_ids, device=self.vocab.device)]
            terms["nearest"] = (1 - F.cosine_similarity(v_star, nearest, dim=-1)).mean()
            weighted["nearest"] = loss_config.contrastive_weight * terms["nearest"]
        if regularization == "contrastive":
            terms["contrastive"] = nearest_neighbor_contrastive_loss(
                everyone, self.vocab, k=loss_config.contrastive_k, temperature=loss_config.temperature,
                exclude=backend.special_token_ids, similarity=loss_config.contrastive_similarity)
            weighted["contrastive"] = loss_config.contrastive_weight * terms["contrastive"]
        if training.hypernetwork:
            terms["lora_l2"] = out.lora.squared_norms().mean()
            weighted["lora_l2"] = loss_config.lora_l2_weight * terms["lora_l2"]

        total = sum(weighted.values())
        objective = total + (world - 1) * weighted["contrastive"] if "contrastive" in weighted else total
        logged = {name: value.detach() for name, value in terms.items()} | {"loss": total.detach()}
        return LossOutput(objective, logged, self.token_metrics(everyone.detach()))

    def token_metrics(self, v_star: Tensor) -> dict[str, Tensor]:
        """Mean cosine of v* to its nearest token, and the share of distinct nearest tokens (mode collapse)."""
        ids = nearest_tokens(v_star, self.vocab, 1, self.backend.special_token_ids)[:, 0]
        cosine = F.cosine_similarity(v_star, self.vocab[ids], dim=-1).mean()
        return {"nearest_cosine": cosine, "distinct_tokens": torch.tensor(ids.unique().numel() / ids.numel())}


def _with_live_rows(everyone: Tensor, local: Tensor, rank: int) -> Tensor:
    """``everyone`` (W*b, D) with rows rank*b ... (rank+1)*b replaced by ``local`` (b, D), out of place."""
    b = local.shape[0]
    return torch.cat([everyone[:rank * b], local, everyone[(rank + 1) * b:]])
