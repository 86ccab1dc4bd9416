"""Inference-time tuning (Sec. 4.4) on the tiny reference stack, and the encoder forward it shares with
pretraining and its validation (``datencoder_core/forward.py``)."""

import dataclasses

import pytest
import torch
from helpers import assert_unchanged, state_checksums

from datencoder_core import DualPathState, TuningConfig, nearest_tokens, personalize
import datencoder_core.forward
from datencoder_core.forward import encoder_forward
from datencoder_core.losses import diffusion_loss
import datencoder_core.tuning
from datencoder_core.tuning import add_noise, predict

FAST = TuningConfig(steps=3)


def _diffusion_loss(backend, concept, latents, config, seed=123, batch=16):
    """Loss of a concept on a fixed set of timesteps and noises: the yardstick for before/after."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(50, 950, batch).long()
    noise = torch.randn((batch, *latents.shape[1:]), generator=g)
    noisy = add_noise(latents.expand(batch, -1, -1, -1), noise, t, backend.alphas_cumprod)
    soft = backend.encode_prompt(config.prompt, concept.token_id, concept.v_star).expand(batch, -1, -1)
    hard = backend.encode_prompt(config.prompt, concept.token_id).expand(batch, -1, -1)
    with torch.no_grad():
        pred = backend.predict_noise(noisy, t, soft, DualPathState(concept.lora, config.alpha_blend, hard))
    return torch.nn.functional.mse_loss(pred, noise).item()


def test_tuning_lowers_diffusion_loss(backend, encoder, cat_image):
    """With the paper's settings (12 steps, lr 2e-3, alpha 0.25) the loss on held-out noise drops, and
    drops further with more steps. Random tiny weights leave little to gain (about 0.1%), so the
    margin asked for is far above float noise (1e-7) but small."""
    config = TuningConfig()
    latents = backend.encode_latents(cat_image)
    losses = [_diffusion_loss(backend, personalize(backend, encoder, "enc", cat_image,
                                                   dataclasses.replace(config, steps=steps)), latents, config)
              for steps in (0, 12, 30)]
    assert losses[0] - losses[1] > 2e-4 and losses[1] - losses[2] > 2e-4, losses


def test_tuning_touches_only_v_star_and_lora(tiny_models, backend, encoder, cat_image):
    modules = [tiny_models.unet, tiny_models.vae, tiny_models.text_encoder, tiny_models.vision_tower, encoder]
    before = state_checksums(*modules)
    concept = personalize(backend, encoder, "enc", cat_image, FAST)
    assert_unchanged(before, modules)
    assert all(p.grad is None for m in modules for p in m.parameters())
    assert any(b.abs().sum() > 0 for b in concept.lora.up.values())  # B moved off its zero init


def test_zero_steps_returns_the_encoder_prediction(backend, encoder, cat_image):
    """steps = 0: v*, A and B are exactly the encoder's one forward (same seed, same noised latent);
    one step already moves them."""
    config = TuningConfig(steps=0)
    concept = personalize(backend, encoder, "enc", cat_image, config)
    forward = predict(backend, encoder, backend.encode_latents(cat_image), cat_image, config.encoder_timestep,
                      torch.Generator().manual_seed(config.seed))
    expected = forward.prediction
    assert torch.equal(concept.v_star, expected.v_star[0])
    for site in expected.lora.down:
        assert torch.equal(concept.lora.down[site], expected.lora.down[site][0])
        assert torch.equal(concept.lora.up[site], expected.lora.up[site][0])
    assert concept.lora.scale == expected.lora.scale
    assert concept.token_id == forward.token_ids[0] == int(nearest_tokens(expected.v_star, backend.token_embeddings, 1,
                                                                        backend.special_token_ids)[0, 0])
    assert concept.token_id not in backend.special_token_ids
    assert concept.token == backend.decode_token(concept.token_id)
    tuned = personalize(backend, encoder, "enc", cat_image, dataclasses.replace(config, steps=1))
    assert (tuned.v_star - expected.v_star[0]).abs().max() > 1e-4


def test_same_inputs_and_seed_give_the_same_concept(backend, encoder, cat_image):
    a, b = (personalize(backend, encoder, "enc", cat_image, FAST) for _ in range(2))
    c = personalize(backend, encoder, "enc", cat_image, dataclasses.replace(FAST, seed=1))
    assert torch.equal(a.v_star, b.v_star)
    assert all(torch.equal(a.lora.up[k], b.lora.up[k]) for k in a.lora.up)
    assert not torch.equal(a.v_star, c.v_star)


def test_progress_reports_every_step_and_interrupt_stops(backend, encoder, cat_image):
    seen = []
    personalize(backend, encoder, "enc", cat_image, FAST, progress=lambda i, n, loss: seen.append((i, n, loss)))
    assert [(i, n) for i, n, _ in seen] == [(1, 3), (2, 3), (3, 3)] and all(loss > 0 for *_, loss in seen)

    class Cancelled(Exception):
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        personalize(backend, encoder, "enc", cat_image, FAST, interrupt=interrupt)
    assert len(calls) == 2  # stopped before the second step


def test_several_photos_of_one_concept_give_one_concept(backend, encoder, cat_image):
    """A batch of photos gives one concept, and every photo counts: with the first photo and the seed
    the same, changing only the second one (the cat again -> its mirror image) changes v* and A."""
    same = personalize(backend, encoder, "enc", torch.cat([cat_image, cat_image]), FAST)
    mirrored = personalize(backend, encoder, "enc", torch.cat([cat_image, cat_image.flip(2)]), FAST)
    assert mirrored.v_star.shape == (backend.token_embeddings.shape[1],)
    assert all(a.ndim == 2 for a in mirrored.lora.down.values())
    # ignoring the second photo would leave row 0's computation, and so the concept, bit-identical
    assert (mirrored.v_star - same.v_star).abs().max() > 2e-4
    assert max((mirrored.lora.down[k] - same.lora.down[k]).abs().max() for k in same.lora.down) > 2e-4


def test_half_precision_models_with_float32_trainables(cat_image):
    """The GPU fast path (frozen models in bf16/fp16, v*, A, B in float32), run in bf16 on the CPU."""
    from training.models.reference import build_random_models

    models = build_random_models("tiny", seed=0).to("cpu", torch.bfloat16)
    encoder = models.random_encoder()
    backend = models.backend()
    full = build_random_models("tiny", seed=0)
    reference = personalize(full.backend(), full.random_encoder(), "enc", cat_image, FAST)
    concept = personalize(backend, encoder, "enc", cat_image, FAST)
    assert concept.v_star.dtype == torch.float32 and all(a.dtype == torch.float32 for a in concept.lora.down.values())
    assert any(b.abs().sum() > 0 for b in concept.lora.up.values())
    # same encoder weights and seed: v* stays close to the float32 run despite bf16 models
    assert torch.allclose(concept.v_star, reference.v_star, atol=0.05)


# The one encoder forward: pretraining, its validation and personalization all run forward.encoder_forward.

def _trained_encoder(tiny_models):
    """A random encoder with non-zero dW (the B heads moved off their zero init)."""
    encoder = tiny_models.random_encoder(seed=1)
    with torch.no_grad():
        for head in encoder.hyper_head.up_heads.values():
            torch.nn.init.normal_(head.weight, std=0.05)
    return encoder


def _held_out(backend, cat_image):
    from training.pretrain.validation import held_out_draws

    return held_out_draws(backend, cat_image, ["cat"], 2, seed=0)  # one image, two (t, noise) draws


def test_pretraining_validation_and_personalization_run_the_one_encoder_forward(tiny_models, backend, cat_image,
                                                                                 monkeypatch):
    """Every encoder forward, wherever it runs, goes through ``forward.noised_features`` at the timesteps its
    caller means (the rows' own in pretraining; the held-out ones and ``TuningConfig.encoder_timestep`` in
    validation; ``encoder_timestep`` in personalization), and every noise prediction with a concept through
    ``forward.concept_noise_prediction`` (one per pretraining batch, two per validation batch, one per
    tuning step)."""
    from training.pretrain.config import resolve_config
    from training.pretrain.objective import PretrainingObjective
    from training.pretrain.validation import encoder_gain

    encoder, images = _trained_encoder(tiny_models), torch.cat([cat_image, cat_image.flip(2)])
    positions = torch.arange(2)
    objective = PretrainingObjective(backend, resolve_config("tiny"))
    rows = objective.encoder_inputs(images, positions)[3].timesteps.tolist()  # the rows' own draws
    encoder_timesteps, predictions = [], []
    noised_features, concept_noise_prediction = (datencoder_core.forward.noised_features,
                                                 datencoder_core.forward.concept_noise_prediction)
    monkeypatch.setattr(datencoder_core.forward, "noised_features",
                        lambda *a: encoder_timesteps.append(a[-1].tolist()) or noised_features(*a))
    assert datencoder_core.tuning.concept_noise_prediction is concept_noise_prediction  # tune's, imported
    for module in (datencoder_core.forward, datencoder_core.tuning):
        monkeypatch.setattr(module, "concept_noise_prediction",
                            lambda *a: predictions.append(a[5].tolist()) or concept_noise_prediction(*a))

    objective(encoder, images, positions, lambda v: v, 0, 1)
    assert encoder_timesteps == predictions == [rows]

    encoder_timesteps.clear(), predictions.clear()
    held_out = _held_out(backend, cat_image)
    encoder_gain(backend, encoder, held_out, 0.25, 2, TuningConfig(encoder_timestep=123))
    assert encoder_timesteps == [held_out.timesteps.tolist(), [123] * 2]
    assert predictions == [held_out.timesteps.tolist()] * 2

    encoder_timesteps.clear(), predictions.clear()
    personalize(backend, encoder, "enc", cat_image, TuningConfig(steps=2, encoder_timestep=321))
    assert encoder_timesteps == [[321]] and len(predictions) == 2 and all(len(t) == 4 for t in predictions)


def test_the_objective_and_validation_predict_the_noise_of_the_core_forward(tiny_models, backend, cat_image,
                                                                            monkeypatch):
    """On the same inputs the objective's noise prediction and diffusion term, and validation's two losses
    with the encoder, are ``encoder_forward``'s to the last bit."""
    from training.pretrain.config import resolve_config
    from training.pretrain.objective import PretrainingObjective
    from training.pretrain.validation import GAIN_PROMPT, encoder_gain

    encoder, images = _trained_encoder(tiny_models), torch.cat([cat_image, cat_image.flip(2)])
    positions = torch.tensor([3, 8])
    seen = []
    predict_noise = backend.predict_noise
    monkeypatch.setattr(backend, "predict_noise", lambda *a: seen.append(predict_noise(*a)) or seen[-1])
    objective = PretrainingObjective(backend, resolve_config("tiny"))
    terms = objective(encoder, images, positions, lambda v: v, 0, 1).terms
    latents, draws = backend.encode_latents(images), objective.encoder_inputs(images, positions)[3]
    with torch.no_grad():
        core = encoder_forward(backend, encoder, images, latents, draws.noise, draws.timesteps,
                               [objective.prompts[i] for i in draws.templates], objective.alpha)
    assert torch.equal(seen[0], core.noise_pred)
    assert torch.equal(terms["diffusion"], diffusion_loss(core.noise_pred, draws.noise))

    held_out = _held_out(backend, cat_image)
    gain = encoder_gain(backend, encoder, held_out, 0.25, 2, TuningConfig(encoder_timestep=700))
    latents = backend.encode_latents(held_out.images)
    prompts, t = [backend.prompt_ids(GAIN_PROMPT)] * 2, held_out.timesteps
    with torch.no_grad():
        as_trained = encoder_forward(backend, encoder, held_out.images, latents, held_out.noise, t, prompts, 0.25)
        fixed_t = encoder_forward(backend, encoder, held_out.images, latents, held_out.encoder_noise,
                                  torch.full_like(t, 700), prompts, 0.25, predict_at=(held_out.noise, t))
    assert gain["loss_encoder"] == diffusion_loss(as_trained.noise_pred, held_out.noise).item()
    assert gain["loss_encoder_fixed_t"] == diffusion_loss(fixed_t.noise_pred, held_out.noise).item()
    # as at personalization: the image's two rows share one prediction, made at t = 700
    assert torch.equal(fixed_t.prediction.v_star[0], fixed_t.prediction.v_star[1])
    assert not torch.equal(as_trained.prediction.v_star[0], as_trained.prediction.v_star[1])


def test_validation_uses_the_configured_encoder_timestep(tiny_models, backend, cat_image):
    """Validation's personalization-style gain and its sample grid follow ``TuningConfig.encoder_timestep``
    (a hard-coded 500 would give the same numbers and images for both settings); the gain as pretraining
    runs the encoder does not depend on it."""
    from training.pretrain.validation import encoder_gain, sample_grid

    encoder, held_out = _trained_encoder(tiny_models), _held_out(backend, cat_image)
    at = {t: encoder_gain(backend, encoder, held_out, 0.25, 2, TuningConfig(encoder_timestep=t)) for t in (500, 100)}
    assert at[500]["encoder_gain"] == at[100]["encoder_gain"]
    assert at[500]["encoder_gain_fixed_t"] != at[100]["encoder_gain_fixed_t"]
    square = cat_image[:, :, 75:375]  # the grid's photos are the training crops, square
    grids = [sample_grid(backend, encoder, square, 0.25, 2, 0, TuningConfig(encoder_timestep=t)) for t in (500, 100)]
    assert not torch.equal(*grids)


# The encoder-free path (issue 27): personalize_from_word, the same tune() from a class word's start.

WORD = TuningConfig(steps=20, lr=1e-3, timesteps_per_step=4)  # WORD_START_TUNING's lr, fewer steps for the CPU


def test_word_start_is_the_words_embedding_and_loras_standard_init(backend):
    """v*_0 is the mean of the word's token rows (one token: its row); A is uniform in +-1/sqrt(D_in) on every
    site, B zero; the seed decides A."""
    from datencoder_core import LoRAConfig, word_start

    for word in ("cat", "a red teapot"):  # the tiny vocabulary spells both in several tokens
        ids = backend.word_token_ids(word)
        assert ids and backend.special_token_ids[0] not in ids and backend.special_token_ids[-1] not in ids
        v, lora = word_start(backend, word, LoRAConfig(), seed=0)
        assert v.dtype == torch.float32 and torch.equal(v, backend.token_embeddings[ids].float().mean(0))
    assert len(ids) > 1
    [one] = backend.word_token_ids("a")  # a one-token word: its row
    assert torch.equal(word_start(backend, "a", LoRAConfig(), 0)[0], backend.token_embeddings[one])
    assert set(lora.down) == {s.name for s in backend.sites} and lora.scale == LoRAConfig().scale
    for site in backend.sites:
        a, b = lora.down[site.name], lora.up[site.name]
        assert a.shape == (4, site.in_features) and a.abs().max() <= 1 / site.in_features**0.5 and a.abs().max() > 0
        assert b.shape == (site.out_features, 4) and not b.any()
    again, other = (word_start(backend, "cat", LoRAConfig(), seed)[1] for seed in (0, 1))
    name = backend.sites[0].name
    assert torch.equal(again.down[name], lora.down[name]) and not torch.equal(other.down[name], lora.down[name])


def test_personalize_from_word_starts_at_the_word(backend, cat_image):
    from datencoder_core import LoRAConfig, personalize_from_word, word_start

    start = personalize_from_word(backend, "cat", LoRAConfig(), cat_image, dataclasses.replace(WORD, steps=0))
    v, lora = word_start(backend, "cat", LoRAConfig(), WORD.seed)
    assert torch.equal(start.v_star, v) and all(torch.equal(start.lora.down[k], lora.down[k]) for k in lora.down)
    assert start.encoder_id == "none" and start.init_word == "cat" and start.tuning.steps == 0
    assert start.token_id == nearest_tokens(v[None], backend.token_embeddings, 1, backend.special_token_ids)[0, 0]


def _learning(backend, cat_image, config):
    """(loss drop, LoRA's share) of the encoder-free path on fixed held-out (t, noise) draws: the loss of the
    start minus that of the tuned concept, and the tuned concept's loss with its start LoRA (dW = 0) minus
    its loss with its tuned LoRA, i.e. what dW learnt."""
    from datencoder_core import LoRAConfig, personalize_from_word

    latents = backend.encode_latents(cat_image)
    start, tuned = (personalize_from_word(backend, "cat", LoRAConfig(), cat_image, dataclasses.replace(config, steps=n))
                    for n in (0, config.steps))
    without_dw = dataclasses.replace(tuned, lora=start.lora)
    loss = _diffusion_loss(backend, tuned, latents, config)
    return (_diffusion_loss(backend, start, latents, config) - loss,
            _diffusion_loss(backend, without_dw, latents, config) - loss)


def _assert_learns(drop, lora_share):
    assert drop > 2e-4 and lora_share > 1e-4, (drop, lora_share)


def test_encoder_free_path_lowers_the_loss_and_a_broken_start_does_not(backend, cat_image, monkeypatch):
    """From the word and dW = 0 the held-out diffusion loss drops over the steps, and dW has its share of the
    drop. Broken control: A = B = 0 at the start gives dW no gradient (dL/dB = 0 through A = 0, dL/dA = 0
    through B = 0), so dW stays 0 and the same check fails."""
    _assert_learns(*_learning(backend, cat_image, WORD))

    start = datencoder_core.tuning._word_start

    def broken(*args):
        v, lora = start(*args)
        return v, type(lora)({k: torch.zeros_like(a) for k, a in lora.down.items()}, lora.up, lora.scale)

    monkeypatch.setattr(datencoder_core.tuning, "_word_start", broken)
    drop, lora_share = _learning(backend, cat_image, WORD)
    assert lora_share == 0.0
    with pytest.raises(AssertionError):
        _assert_learns(drop, lora_share)


def test_personalize_from_word_is_deterministic(backend, cat_image):
    from datencoder_core import LoRAConfig, personalize_from_word

    config = dataclasses.replace(WORD, steps=2)
    a, b, c = (personalize_from_word(backend, "cat", LoRAConfig(), cat_image, dataclasses.replace(config, seed=s))
               for s in (0, 0, 1))
    assert torch.equal(a.v_star, b.v_star) and all(torch.equal(a.lora.up[k], b.lora.up[k]) for k in a.lora.up)
    assert all(torch.equal(a.lora.down[k], b.lora.down[k]) for k in a.lora.down)
    assert not torch.equal(a.v_star, c.v_star)


class _NaNBackend:
    """The tiny backend whose UNet returns NaN from its ``bad_call``-th noise prediction on."""

    def __init__(self, backend, bad_call=1):
        self._backend, self._calls, self._bad_call = backend, 0, bad_call

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def predict_noise(self, *args, **kwargs):
        self._calls += 1
        out = self._backend.predict_noise(*args, **kwargs)
        return out * float("nan") if self._calls >= self._bad_call else out


@pytest.mark.parametrize("case", ["nan_backend", "huge_lr"])
def test_a_non_finite_loss_stops_at_once_with_a_clear_error(backend, encoder, cat_image, case):
    """Nothing non-finite is ever returned: the step, the lr and the fix are named, and no step follows."""
    from datencoder_core import DATEncoderError, LoRAConfig, personalize_from_word

    seen = []
    if case == "nan_backend":
        config, tuned = dataclasses.replace(WORD, steps=5), _NaNBackend(backend, bad_call=3)
        with pytest.raises(DATEncoderError, match=r"^tuning diverged: the loss of step 3/5 is nan at lr 0\.001; no "
                                                  r"concept was made\. Lower lr \(e\.g\. to 0\.0001\)"):
            personalize_from_word(tuned, "cat", LoRAConfig(), cat_image, config,
                                  progress=lambda i, n, loss: seen.append(i))
        assert seen == [1, 2]
        with pytest.raises(DATEncoderError, match="tuning diverged: the loss of step 1/3"):
            personalize(_NaNBackend(backend), encoder, "enc", cat_image, FAST)
    else:
        config = dataclasses.replace(WORD, steps=30, lr=1e6, timesteps_per_step=1)
        with pytest.raises(DATEncoderError, match=r"^tuning diverged: .* at lr 1e\+06; no concept was made\. Lower "
                                                  r"lr \(e\.g\. to 100000\)"):
            personalize_from_word(backend, "cat", LoRAConfig(), cat_image, config,
                                  progress=lambda i, n, loss: seen.append(loss))
        assert all(torch.isfinite(torch.tensor(seen)))
