"""The DATEncoder's forward, from concept images to a noise prediction: the one path that pretraining
(``training.pretrain.objective``), its validation (``training.pretrain.validation``) and personalization
(``tuning.py``) run, so that what validation measures is what training optimises and what the node uses.

    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps                 forward diffusion, Eq. 1's z_t
    (v*, A, B) = E(CLIP(I), UNet_mid(z_t, t))                     the encoder (Sec. 4.1)
    v_h = nearest real token of v*,  C = C(v*),  C_h = C(v_h)     the two prompts (Sec. 4.3)
    eps_theta(z_t', t', C, C_h; W + dW, a)                        Eq. 5 in every attention module

Pretraining predicts the noise at the z_t the encoder saw (t' = t). Personalization runs the encoder
once on the concept noised at a fixed t (``TuningConfig.encoder_timestep``) and then, between AdamW
steps, predicts the noise of fresh (t', eps') draws from the tuned v*, A and B: the second half,
``concept_noise_prediction``, which ``encoder_forward`` ends with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .attention import DualPathState
from .backend import PersonalizationBackend
from .encoder import DATEncoder, EncoderOutput
from .errors import DATEncoderError
from .lora import LoRAFactors
from .prompts import PromptIds
from .vocab import nearest_tokens


@dataclass
class EncoderForward:
    """What ``encoder_forward`` computed."""

    prediction: EncoderOutput  # v* (N, D) in float32 and the factors (N, ...): N = B, or 1 when pooled
    token_ids: list[int]  # (N,) each v*'s nearest real token, the hard path's v_h
    noisy: Tensor  # (B, 4, h, w) the z_t the noise is predicted at
    noise_pred: Tensor | None  # (B, 4, h, w) eps_theta with Eq. 5 on; None when no prompts were given


def add_noise(latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion q(z_t | z_0) = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps."""
    abar = alphas_cumprod[timesteps].view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return abar.sqrt() * latents + (1 - abar).sqrt() * noise


@torch.no_grad()
def noised_features(backend: PersonalizationBackend, images: Tensor, latents: Tensor, noise: Tensor,
                    timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The frozen half of the encoder forward: z_t (B, 4, h, w) from ``latents`` (B, 4, h, w), ``noise``
    (B, 4, h, w, cast to the latents' dtype) and ``timesteps`` (B,), then the encoder's inputs at z_t
    (``backend.image_features``: CLIP tokens of ``images`` (B, H, W, 3), UNet mid features). No gradient."""
    noisy = _z_t(backend, latents, noise, timesteps)
    return noisy, *backend.image_features(images, noisy, timesteps.to(latents.device))


def encoder_forward(backend: PersonalizationBackend, encoder: DATEncoder, images: Tensor, latents: Tensor,
                    noise: Tensor, timesteps: Tensor, prompts: Sequence[PromptIds] | None = None,
                    alpha: float | None = None, *, pool: bool = False,
                    predict_at: tuple[Tensor, Tensor] | None = None) -> EncoderForward:
    """Concept images -> encoder -> nearest tokens -> both prompts -> noise prediction (Eq. 1, Eq. 5).

    ``images`` (B, H, W, 3) in [0, 1] with their ``latents`` (B, 4, h, w) are noised by ``noise`` (B, 4, h, w)
    at ``timesteps`` (B,) into z_t, the encoder's UNet input (Sec. 4.1). The encoder runs in the caller's grad
    mode on its inputs cast to its parameters' dtype (a DDP-wrapped encoder is called as a module), and its v*
    is returned in float32 (under autocast it comes out in half precision). ``pool``: the images are photos of
    one concept, whose trunk features are averaged into one prediction (N = 1, personalization); otherwise
    every row is its own concept (N = B, pretraining).

    With ``prompts`` (one ``PromptIds`` per concept) and ``alpha`` (a of Eq. 5) the UNet then predicts the noise
    with the dual path (``concept_noise_prediction``): at z_t itself (pretraining: Eq. 1's loss is on the
    latent the encoder saw), or, with ``predict_at`` = (noise', timesteps') (B, ...), at the same latents
    noised by those (the encoder ran at personalization's fixed t). The loss
    ||eps - eps_theta||^2 (``losses.diffusion_loss``) is the caller's. Nothing is written: the backend's
    models and the encoder are only read; the gradient reaches the encoder through v* and A, B.
    """
    if (prompts is None) != (alpha is None):
        raise ValueError("encoder_forward: pass prompts and alpha together (both, to predict the noise; neither)")
    noisy, clip_tokens, unet_features = noised_features(backend, images, latents, noise, timesteps)
    dtype = next(encoder.parameters()).dtype  # the backend's models may run in half precision
    clip_tokens, unet_features = clip_tokens.to(backend.device, dtype), unet_features.to(backend.device, dtype)
    if pool:
        out = encoder.heads(encoder.features(clip_tokens, unet_features).mean(0, keepdim=True))
    else:
        out = encoder(clip_tokens, unet_features)
    prediction = EncoderOutput(out.v_star.float(), out.lora)
    if prompts is None:
        return EncoderForward(prediction, nearest_token_ids(backend, prediction.v_star), noisy, None)
    if predict_at is not None:
        noisy, timesteps = _z_t(backend, latents, *predict_at), predict_at[1]
    v_star, lora = (prediction.v_star[0], prediction.lora.row(0)) if pool else (prediction.v_star, prediction.lora)
    noise_pred, token_ids = concept_noise_prediction(backend, v_star, lora, prompts, noisy, timesteps, alpha)
    return EncoderForward(prediction, token_ids, noisy, noise_pred)


def concept_noise_prediction(backend: PersonalizationBackend, v_star: Tensor, lora: LoRAFactors,
                             prompts: Sequence[PromptIds], noisy: Tensor, timesteps: Tensor, alpha: float,
                             hard_contexts: dict[tuple[PromptIds, int], Tensor] | None = None,
                             ) -> tuple[Tensor, list[int]]:
    """The second half of ``encoder_forward``, from given concepts: eps_theta(z_t, t, C, C_h; W + dW, a) of
    Eq. 5, where C is each prompt with v* in its slot (differentiable) and C_h the same prompt with v*'s
    nearest real token v_h (no gradient; start/end tokens never chosen). Returns the prediction (B, 4, h, w)
    and the v_h ids (N,).

    One concept for the whole batch (personalization's tuning steps): v* (D,), unbatched factors, one
    prompt; its two contexts are encoded once and broadcast (``backend.encode_prompt``). One concept per row
    (pretraining): v* (B, D), factors (B, ...), B prompts, through ``encode_prompts``, which the reference
    backend has beside the protocol's ``encode_prompt``. ``noisy`` (B, 4, h, w), ``timesteps`` (B,).
    ``hard_contexts`` caches C_h by (prompt, token) across calls (exact: C_h has no gradient).
    """
    shared = v_star.ndim == 1
    token_ids = nearest_token_ids(backend, v_star[None] if shared else v_star)
    if len(prompts) != len(token_ids):
        raise DATEncoderError(f"concept_noise_prediction: expected one prompt per concept ({len(token_ids)}), "
                              f"got {len(prompts)}")
    batch = noisy.shape[0]
    if shared:
        key = (prompts[0], token_ids[0])
        hard = None if hard_contexts is None else hard_contexts.get(key)
        if hard is None:
            with torch.no_grad():
                hard = backend.encode_prompt(prompts[0], token_ids[0])
            if hard_contexts is not None:
                hard_contexts[key] = hard
        context = backend.encode_prompt(prompts[0], token_ids[0], v_star).expand(batch, -1, -1)
        hard = hard.expand(batch, -1, -1)
    else:
        if not hasattr(backend, "encode_prompts"):
            raise DATEncoderError(f"{type(backend).__name__} encodes one concept at a time (encode_prompt); one "
                                  f"concept per row needs encode_prompts: pass v* (D,) and unbatched factors")
        context = backend.encode_prompts(prompts, token_ids, v_star)
        with torch.no_grad():
            hard = backend.encode_prompts(prompts, token_ids)
    noise_pred = backend.predict_noise(noisy, timesteps.to(noisy.device), context, DualPathState(lora, alpha, hard))
    return noise_pred, token_ids


def nearest_token_ids(backend: PersonalizationBackend, v_star: Tensor) -> list[int]:
    """v_h for each row of ``v_star`` (N, D): the nearest real token by cosine, never a start/end token."""
    return nearest_tokens(v_star, backend.token_embeddings, 1, backend.special_token_ids)[:, 0].tolist()


@torch.no_grad()
def _z_t(backend: PersonalizationBackend, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    return add_noise(latents, noise.to(latents), timesteps.to(latents.device), backend.alphas_cumprod)
