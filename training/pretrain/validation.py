"""What a run is watched by, besides the training losses: the held-out encoder gain and image grids.

Encoder gain: on a fixed held-out image set with fixed timesteps and noise, the diffusion loss (Eq. 1)
with no concept (zero LoRA, the prompt "a photo of <class word>", or "object" without one) minus the
loss with the encoder's prediction (its v* in "a photo of {}" and its dW, with the run's dual path). It
is about 0 for a fresh encoder and grows while the encoder learns: the learning signal at any scale.
The encoder runs through ``datencoder_core.forward.encoder_forward``, as training and personalization
run it, in their two ways: ``encoder_gain`` as pretraining does (the encoder sees the noised latent the
loss is taken at), ``encoder_gain_fixed_t`` as personalization does (one prediction per image from the
photo noised at ``TuningConfig.encoder_timestep``, then the loss at the same held-out draws).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from datencoder_core.config import TuningConfig
from datencoder_core.encoder import DATEncoder
from datencoder_core.forward import encoder_forward
from datencoder_core.losses import diffusion_loss
from datencoder_core.reference import DiffusersReferenceBackend
from datencoder_core.tuning import predict

from training.data.sources import sample_seed
from training.evaluate.sampling import ConceptPrediction, generate

GAIN_PROMPT = "a photo of {}"
SAMPLE_PROMPTS = ("a photo of {}", "a watercolor painting of {} on a beach")  # S* as is, then recontextualised
GUIDANCE = 5.0


@dataclass
class HeldOut:
    """The held-out set with its fixed draws: each image repeated ``timesteps`` times."""

    images: Tensor  # (n*T, S, S, 3)
    words: list[str]  # (n*T,)
    timesteps: Tensor  # (n*T,)
    noise: Tensor  # (n*T, 4, h, w)
    encoder_noise: Tensor  # (n*T, 4, h, w), one draw per image: its noise at the fixed encoder timestep


def held_out_draws(backend: DiffusersReferenceBackend, images: Tensor, words: list[str], timesteps: int,
                   seed: int) -> HeldOut:
    n = images.shape[0]
    with torch.no_grad():
        latent_shape = backend.encode_latents(images[:1]).shape[1:]
    generator = torch.Generator().manual_seed(sample_seed(seed, 0, 3))
    t = torch.randint(len(backend.alphas_cumprod), (n * timesteps,), generator=generator)
    noise = torch.randn((n * timesteps, *latent_shape), generator=generator)
    encoder_noise = torch.randn((n, *latent_shape), generator=generator).repeat_interleave(timesteps, 0)
    return HeldOut(images.repeat_interleave(timesteps, 0), [w for w in words for _ in range(timesteps)], t, noise,
                   encoder_noise)


@torch.no_grad()
def encoder_gain(backend: DiffusersReferenceBackend, encoder: DATEncoder, held_out: HeldOut, alpha: float,
                 batch: int, tuning: TuningConfig = TuningConfig()) -> dict[str, float]:
    """{"loss_encoder", "loss_encoder_fixed_t", "loss_no_concept", "encoder_gain", "encoder_gain_fixed_t"}
    over the held-out set, in batches of ``batch``; ``_fixed_t``: the encoder run at ``tuning.encoder_timestep``
    (module docstring). Both at the dual path's ``alpha``."""
    prompt = backend.prompt_ids(GAIN_PROMPT)
    totals = {"loss_encoder": 0.0, "loss_encoder_fixed_t": 0.0, "loss_no_concept": 0.0}
    for start in range(0, held_out.images.shape[0], batch):
        rows = slice(start, start + batch)
        images, t = held_out.images[rows], held_out.timesteps[rows].to(backend.device)
        latents = backend.encode_latents(images)
        noise = held_out.noise[rows].to(latents)
        prompts = [prompt] * images.shape[0]
        as_trained = encoder_forward(backend, encoder, images, latents, noise, t, prompts, alpha)
        fixed_t = torch.full_like(t, tuning.encoder_timestep)
        as_personalized = encoder_forward(backend, encoder, images, latents, held_out.encoder_noise[rows], fixed_t,
                                          prompts, alpha, predict_at=(noise, t))
        plain = [backend.prompt_ids(GAIN_PROMPT.format(word or "object")) for word in held_out.words[rows]]
        without = backend.unet(as_trained.noisy, t,
                               encoder_hidden_states=backend.encode_prompts(plain, [0] * len(plain))).sample
        share = images.shape[0] / held_out.images.shape[0]
        totals["loss_encoder"] += diffusion_loss(as_trained.noise_pred, noise).item() * share
        totals["loss_encoder_fixed_t"] += diffusion_loss(as_personalized.noise_pred, noise).item() * share
        totals["loss_no_concept"] += diffusion_loss(without, noise).item() * share
    return totals | {"encoder_gain": totals["loss_no_concept"] - totals["loss_encoder"],
                     "encoder_gain_fixed_t": totals["loss_no_concept"] - totals["loss_encoder_fixed_t"]}


@torch.no_grad()
def sample_grid(backend: DiffusersReferenceBackend, encoder: DATEncoder, photos: Tensor, alpha: float,
                steps: int, seed: int, tuning: TuningConfig = TuningConfig()) -> Tensor:
    """One row per concept photo: the photo, then a generation per ``SAMPLE_PROMPTS`` with the encoder's
    prediction as personalization makes it (``tuning.predict`` at ``tuning.encoder_timestep``, no tuning
    steps), ``training.evaluate.sampling.generate`` (DDIM with ``steps`` steps, classifier-free guidance, the dual
    path at ``alpha``). (3, H, W) in [0, 1]."""
    from torchvision.utils import make_grid

    generator = torch.Generator().manual_seed(seed)
    size = photos.shape[1]
    tiles = []
    for index, photo in enumerate(photos):
        forward = predict(backend, encoder, backend.encode_latents(photo[None]), photo[None], tuning.encoder_timestep,
                          generator)
        concept = ConceptPrediction(forward.prediction.v_star[0], forward.prediction.lora.row(0), forward.token_ids[0])
        tiles.append(photo.movedim(-1, 0))
        for template in SAMPLE_PROMPTS:
            image = generate(backend, concept, template, [seed + index], alpha=alpha, steps=steps,
                             guidance=GUIDANCE)[0].movedim(-1, 0)
            tiles.append(torch.nn.functional.interpolate(image[None], size=(size, size), mode="bilinear")[0])
    return make_grid(tiles, nrow=1 + len(SAMPLE_PROMPTS), padding=2)
