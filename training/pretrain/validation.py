"""What a run is watched by, besides the training losses: the held-out encoder gain and image grids.

Encoder gain: on a fixed held-out image set with fixed timesteps and noise, the diffusion loss (Eq. 1)
with no concept (zero LoRA, the prompt "a photo of <class word>", or "object" without one) minus the
loss with the encoder's prediction (its v* in "a photo of {}" and its dW, with the run's dual path). It
is about 0 for a fresh encoder and grows while the encoder learns: the learning signal at any scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from datencoder_core.attention import DualPathState
from datencoder_core.encoder import DATEncoder
from datencoder_core.losses import diffusion_loss
from datencoder_core.reference import DiffusersReferenceBackend
from datencoder_core.tuning import add_noise, predict
from datencoder_core.vocab import nearest_tokens

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


def held_out_draws(backend: DiffusersReferenceBackend, images: Tensor, words: list[str], timesteps: int,
                   seed: int) -> HeldOut:
    n = images.shape[0]
    with torch.no_grad():
        latent_shape = backend.encode_latents(images[:1]).shape[1:]
    generator = torch.Generator().manual_seed(sample_seed(seed, 0, 3))
    return HeldOut(images.repeat_interleave(timesteps, 0), [w for w in words for _ in range(timesteps)],
                   torch.randint(len(backend.alphas_cumprod), (n * timesteps,), generator=generator),
                   torch.randn((n * timesteps, *latent_shape), generator=generator))


@torch.no_grad()
def encoder_gain(backend: DiffusersReferenceBackend, encoder: DATEncoder, held_out: HeldOut, alpha: float,
                 batch: int) -> dict[str, float]:
    """{"loss_encoder", "loss_no_concept", "encoder_gain"} over the held-out set, in batches of ``batch``."""
    prompt = backend.prompt_ids(GAIN_PROMPT)
    totals = {"loss_encoder": 0.0, "loss_no_concept": 0.0}
    for start in range(0, held_out.images.shape[0], batch):
        rows = slice(start, start + batch)
        images, t = held_out.images[rows], held_out.timesteps[rows].to(backend.device)
        latents = backend.encode_latents(images)
        noise = held_out.noise[rows].to(latents)
        noisy = add_noise(latents, noise, t, backend.alphas_cumprod)
        clip_tokens, unet_features = backend.image_features(images, noisy, t)
        out = encoder(clip_tokens.float(), unet_features.float())
        token_ids = nearest_tokens(out.v_star, backend.token_embeddings, 1, backend.special_token_ids)[:, 0].tolist()
        context = backend.encode_prompts([prompt] * len(token_ids), token_ids, out.v_star)
        hard = backend.encode_prompts([prompt] * len(token_ids), token_ids)
        with_encoder = backend.predict_noise(noisy, t, context, DualPathState(out.lora, alpha, hard))
        plain = [backend.prompt_ids(GAIN_PROMPT.format(word or "object")) for word in held_out.words[rows]]
        without = backend.unet(noisy, t, encoder_hidden_states=backend.encode_prompts(plain, [0] * len(plain))).sample
        share = images.shape[0] / held_out.images.shape[0]
        totals["loss_encoder"] += diffusion_loss(with_encoder, noise).item() * share
        totals["loss_no_concept"] += diffusion_loss(without, noise).item() * share
    return totals | {"encoder_gain": totals["loss_no_concept"] - totals["loss_encoder"]}


@torch.no_grad()
def sample_grid(backend: DiffusersReferenceBackend, encoder: DATEncoder, photos: Tensor, alpha: float,
                steps: int, seed: int) -> Tensor:
    """One row per concept photo: the photo, then a generation per ``SAMPLE_PROMPTS`` with the encoder's
    prediction (no tuning), ``training.sampling.generate`` (DDIM with ``steps`` steps, classifier-free
    guidance, the dual path at ``alpha``). (3, H, W) in [0, 1]."""
    from torchvision.utils import make_grid

    generator = torch.Generator().manual_seed(seed)
    size = photos.shape[1]
    tiles = []
    for index, photo in enumerate(photos):
        prediction = predict(backend, encoder, backend.encode_latents(photo[None]), photo[None], 500, generator)
        token_id = int(nearest_tokens(prediction.v_star, backend.token_embeddings, 1, backend.special_token_ids)[0, 0])
        concept = ConceptPrediction(prediction.v_star[0], prediction.lora.row(0), token_id)
        tiles.append(photo.movedim(-1, 0))
        for template in SAMPLE_PROMPTS:
            image = generate(backend, concept, template, [seed + index], alpha=alpha, steps=steps,
                             guidance=GUIDANCE)[0].movedim(-1, 0)
            tiles.append(torch.nn.functional.interpolate(image[None], size=(size, size), mode="bilinear")[0])
    return make_grid(tiles, nrow=1 + len(SAMPLE_PROMPTS), padding=2)
