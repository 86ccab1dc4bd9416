"""Pretraining (training.pretrain) on the tiny preset: learning, exact resume after a SIGKILL mid-checkpoint,
two processes = one, the ablation switches, the config and the refusals before a run starts."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datencoder_core import DATEncoder, DATEncoderError, discover_sites
from datencoder_core.attention import DualPathState
from datencoder_core.checkpoint import load_encoder, read_safetensors
from training.data.sources import ProcessShard, SkimagePhotos, split_heldout
from training.pretrain import checkpoints
from training.pretrain.config import resolve_config
from training.pretrain.objective import PretrainingObjective
from training.pretrain.train import main

REPO = Path(__file__).resolve().parents[1]
# Short runs: no grids, the encoder gain only at the first and last step.
SHORT = ["--preset", "tiny", "--set", "training.steps=6", "--set", "training.checkpoint_every=1",
         "--set", "training.validation_every=1000", "--set", "training.sample_images=0", "--set", "training.log_every=1"]


def scalars(output_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "logs" / "pretrain"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_tiny_preset_learns_and_exports(tiny_pretraining):
    """Over the 60-step tiny run the contrastive loss falls and the held-out encoder gain grows. With the
    v* path cut (v_star.detach() before the text encoder) or lr ~ 0, neither margin is met (checked by
    hand: README, "Checking the learning test")."""
    contrastive = scalars(tiny_pretraining, "train/contrastive")
    gain = scalars(tiny_pretraining, "heldout/encoder_gain")
    first, last = min(contrastive), max(contrastive)
    assert contrastive[last] < 0.5 * contrastive[first], contrastive
    assert gain[0] < 2e-3 and gain[max(gain)] > gain[0] + 5e-3, gain
    assert (tiny_pretraining / "samples" / "step-0000060.png").is_file()
    # the gain as personalization uses the encoder (one prediction at its fixed t), logged beside it (issue 26)
    assert scalars(tiny_pretraining, "heldout/encoder_gain_fixed_t").keys() == gain.keys()
    for tag in ("train/diffusion", "train/embedding_l2", "train/lora_l2", "train/lr", "train/grad_norm",
                "train/nearest_cosine", "train/distinct_tokens", "train/data_share", "train/images_per_second"):
        assert scalars(tiny_pretraining, tag), tag


def test_export_loads_in_the_core_with_config_and_step(tiny_pretraining, tmp_path):
    exported = tiny_pretraining / checkpoints.EXPORTED
    encoder, encoder_id = load_encoder(exported)
    _, metadata = read_safetensors(exported, "datencoder.encoder", (1,))
    assert metadata["pretrain_step"] == "60" and encoder_id.startswith("datencoder-pretrained@")
    assert json.loads(metadata["pretrain_config"])["config"]["training"]["steps"] == 60
    # python -m training.export gives the same file from the last checkpoint
    out = tmp_path / "again.safetensors"
    subprocess.run([sys.executable, "-m", "training.export", str(tiny_pretraining / "checkpoints" / "step-0000060"),
                    str(out)], cwd=REPO, check=True, capture_output=True)
    assert load_encoder(out)[1] == encoder_id


def _run(output_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "training.pretrain", *SHORT, "--output-dir", str(output_dir),
                             *extra], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stop_mid_checkpoint(process: subprocess.Popen, output_dir: Path) -> str:
    """SIGSTOP the run as soon as a checkpoint is being written (its .tmp folder exists), check it is
    still unrenamed, then SIGKILL: a kill -9 in the middle of save_state. Returns the interrupted name."""
    folder = output_dir / "checkpoints"
    while process.poll() is None:
        pending = [p.name for p in folder.glob(".step-*.tmp")] if folder.is_dir() else []
        if pending and any(folder.glob("step-*")):  # the second checkpoint or later: one is complete
            process.send_signal(signal.SIGSTOP)
            name = pending[0][1:-4]
            if (folder / pending[0]).is_dir() and not (folder / name).exists():
                process.kill()
                process.wait()
                return name
            process.send_signal(signal.SIGCONT)  # renamed before the stop landed: wait for the next one
        time.sleep(0.001)
    raise AssertionError(f"the run ended before a checkpoint write was caught: {process.stderr.read()[-2000:]}")


def test_sigkill_during_a_checkpoint_then_resume_auto_equals_the_straight_run(tmp_path):
    """6 steps straight == k steps, killed while writing checkpoint k+1, `--resume auto` from step k,
    6 - k more: the same encoder weights, optimizer moments and scheduler, exactly (one process)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    main([*SHORT, "--output-dir", str(straight)])
    interrupted = _stop_mid_checkpoint(_run(killed), killed)
    done = [p.name for p in checkpoints.complete_checkpoints(killed)]
    assert done and done[-1] < interrupted
    main([*SHORT, "--output-dir", str(killed), "--resume", "auto"])
    for name in ("encoder.safetensors",):
        a, b = (load_file(str(run / "checkpoints" / "step-0000006" / name)) for run in (straight, killed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (torch.load(run / "checkpoints" / "step-0000006" / "optimizer.bin", weights_only=True)
            for run in (straight, killed))
    for key, moments in a["state"].items():
        assert all(torch.equal(moments[m], b["state"][key][m]) for m in ("exp_avg", "exp_avg_sq", "step"))
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"]
    assert [p.name for p in checkpoints.complete_checkpoints(killed)] == ["step-0000005", "step-0000006"]
    assert not list((killed / "checkpoints").glob(".*"))  # the interrupted write was cleaned up


def test_two_processes_equal_one_with_the_same_global_batch(tiny_models, tmp_path):
    """accelerate launch --cpu --num_processes 2 (2 rows each) == 1 process (4 rows), after 3 steps. The
    logged losses agree to 1e-5, Eq. 3 included, which is evaluated over the whole global batch (with each
    process's own 2 rows as negatives it would not). The weight updates agree to 1% (measured: 0.2%): float
    sums run in another order, and Adam's g / sqrt(v) amplifies that noise in the few weights whose
    gradient is ~0 (conv biases before a GroupNorm), so a per-element tolerance would be meaningless."""
    args = ["--set", "training.steps=3", "--set", "training.checkpoint_every=3"]
    one, two = tmp_path / "one", tmp_path / "two"
    main([*SHORT, *args, "--output-dir", str(one)])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(_free_port()), "-m", "training.pretrain", *SHORT, *args, "--output-dir", str(two)]
    result = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = resolve_config("tiny")
    torch.manual_seed(config.training.seed)  # the encoder's initial weights, as main() makes them
    start = DATEncoder(config.encoder, config.lora, discover_sites(tiny_models.unet.named_modules(),
                                                                    config.lora.targets)).state_dict()
    a, b = (load_file(str(run / checkpoints.EXPORTED)) for run in (one, two))
    difference = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt()
    update = sum(((a[k] - start[k]) ** 2).sum() for k in a).sqrt()
    assert update > 0 and difference < 1e-2 * update, (difference, update)
    for tag in ("train/contrastive", "train/diffusion", "train/loss"):
        for step, value in scalars(one, tag).items():
            assert scalars(two, tag)[step] == pytest.approx(value, abs=1e-5), tag


def _free_port() -> int:
    from training.headless.comfyui import free_port

    return free_port()


@pytest.mark.parametrize("switch, expected", [
    ("training.embedding_regularization=none", {"diffusion", "lora_l2"}),
    ("training.embedding_regularization=l2", {"diffusion", "embedding_l2", "lora_l2"}),
    ("training.embedding_regularization=nearest", {"diffusion", "embedding_l2", "nearest", "lora_l2"}),
    ("training.embedding_regularization=contrastive", {"diffusion", "embedding_l2", "contrastive", "lora_l2"}),
    ("training.hypernetwork=false", {"diffusion", "embedding_l2", "contrastive"}),
])
def test_ablation_switches_name_the_loss_terms(tiny_models, switch, expected):
    config = resolve_config("tiny", None, (switch,))
    backend = tiny_models.backend(config.lora)
    try:
        objective = PretrainingObjective(backend, config)
        encoder = tiny_models.random_encoder(config.lora)
        images, positions = _batch(tiny_models.image_size)
        out = objective(encoder, images, positions, lambda v: v, 0, 1)
        assert set(out.terms) == expected | {"loss"}
        weights = {"diffusion": 1.0, "embedding_l2": config.loss.embedding_l2_weight,
                   "lora_l2": config.loss.lora_l2_weight, "nearest": config.loss.contrastive_weight,
                   "contrastive": config.loss.contrastive_weight}
        total = sum(weights[name] * out.terms[name] for name in expected)
        assert out.terms["loss"] == pytest.approx(total.item(), rel=1e-6)
        if "nearest" in expected:
            assert 0 <= out.terms["nearest"] <= 2
    finally:
        backend.remove()


def test_dual_path_switch_off_trains_plain_lora_and_on_trains_eq5(tiny_models, monkeypatch):
    """What the objective trains, not what it stores: with ``training.dual_path=false`` its noise prediction
    and diffusion loss are plain LoRA's, rebuilt outside it (each row's W + dW merged into a copy of the
    UNet, the soft prompt alone: Eq. 5 at a = 1); with the switch on they are Eq. 5 at ``alpha_blend`` =
    0.25, which differ. The objective's predictions are recorded as the backend returns them."""
    import copy

    from diffusers.models.attention_processor import AttnProcessor2_0

    from datencoder_core.losses import diffusion_loss
    from datencoder_core.vocab import nearest_tokens

    def merged_unet(lora):  # plain LoRA: W + scale * B @ A written into a copy's weights, diffusers' attention
        unet = copy.deepcopy(tiny_models.unet)
        unet.set_attn_processor(AttnProcessor2_0())
        modules = dict(unet.named_modules())
        for site, a in lora.down.items():
            modules[site].weight += lora.scale * lora.up[site] @ a
        return unet

    on_config, off_config = resolve_config("tiny"), resolve_config("tiny", None, ("training.dual_path=false",))
    backend = tiny_models.backend(off_config.lora)
    predictions, predict_noise = [], backend.predict_noise

    def recorded(*args):
        predictions.append(predict_noise(*args))
        return predictions[-1]

    monkeypatch.setattr(backend, "predict_noise", recorded)
    try:
        encoder = tiny_models.random_encoder(off_config.lora, seed=1)
        images, positions = _batch(tiny_models.image_size)
        with torch.no_grad():
            for head in encoder.hyper_head.up_heads.values():
                torch.nn.init.normal_(head.weight, std=0.05)  # non-zero dW: the LoRA acts
            on, off = (PretrainingObjective(backend, config)(encoder, images, positions, lambda v: v, 0, 1).terms
                       for config in (on_config, off_config))
            objective = PretrainingObjective(backend, off_config)  # only for its frozen half and prompts
            noisy, clip_tokens, unet_features, draws = objective.encoder_inputs(images, positions)
            out = encoder(clip_tokens, unet_features)
            v_star = out.v_star.float()
            tokens = nearest_tokens(v_star, objective.vocab, 1, backend.special_token_ids)[:, 0].tolist()
            context = backend.encode_prompts([objective.prompts[i] for i in draws.templates], tokens, v_star)
            plain = torch.cat([merged_unet(out.lora.row(i))(noisy[i:i + 1], draws.timesteps[i:i + 1],
                                                            encoder_hidden_states=context[i:i + 1]).sample
                               for i in range(len(images))])
            hard = backend.encode_prompts([objective.prompts[i] for i in draws.templates], tokens)
            eq5 = predict_noise(noisy, draws.timesteps, context, DualPathState(out.lora, 0.25, hard))
        assert out.lora.squared_norms().min() > 0 and len(predictions) == 2
        predicted_on, predicted_off = predictions
        torch.testing.assert_close(predicted_off, plain, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(predicted_on, eq5, atol=1e-5, rtol=1e-4)
        assert (predicted_on - predicted_off).abs().max() > 1e-3  # measured: 0.04, 4000x the tolerance above
        assert off["diffusion"].item() == pytest.approx(diffusion_loss(plain, draws.noise).item(), rel=1e-5)
        assert on["diffusion"].item() == pytest.approx(diffusion_loss(eq5, draws.noise).item(), rel=1e-5)
        assert on["diffusion"] != off["diffusion"]
    finally:
        backend.remove()


def _batch(image_size: int, n: int = 2):
    source = SkimagePhotos()
    train, _ = split_heldout(source, 4, 0)
    shard = ProcessShard(source, train, image_size, 0, n, 0, 1, 0, 1)
    images, positions, _ = zip(*(shard[i] for i in range(n)))
    return torch.stack(images), torch.tensor(positions)


def test_a_batch_of_concepts_equals_each_concept_alone(tiny_models):
    """One concept per row (pretraining): batched v*, LoRA, hard tokens and timesteps give each row's
    result run alone."""
    backend = tiny_models.backend()
    try:
        encoder = tiny_models.random_encoder(seed=1)
        with torch.no_grad():
            for head in encoder.hyper_head.up_heads.values():
                torch.nn.init.normal_(head.weight, std=0.05)  # non-zero dW
            images, _ = _batch(tiny_models.image_size)
            latents = backend.encode_latents(images)
            t = torch.tensor([100, 800])
            clip_tokens, unet_features = backend.image_features(images, latents, t)
            out = encoder(clip_tokens, unet_features)
            prompts = [backend.prompt_ids("a photo of {}"), backend.prompt_ids("a rendition of a {}")]
            tokens = [70, 80]
            batched = backend.predict_noise(latents, t, backend.encode_prompts(prompts, tokens, out.v_star),
                                            DualPathState(out.lora, 0.25, backend.encode_prompts(prompts, tokens)))
            for i in range(2):
                alone = backend.predict_noise(
                    latents[i:i + 1], t[i:i + 1], backend.encode_prompt(prompts[i], tokens[i], out.v_star[i]),
                    DualPathState(out.lora.row(i), 0.25, backend.encode_prompt(prompts[i], tokens[i])))
                torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-4)
    finally:
        backend.remove()


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "run.toml").write_text("[training]\nsteps = 100\nlr = 3e-4\n[loss]\ntemperature = 0.1\n")
    (tmp_path / "run.yaml").write_text("training:\n  steps: 100\n  lr: 3.0e-4\nloss:\n  temperature: 0.1\n")
    for name in ("run.toml", "run.yaml"):
        config = resolve_config("tiny", tmp_path / name, ("training.steps=7", "training.dual_path=false"))
        assert (config.training.steps, config.training.lr, config.loss.temperature) == (7, 3e-4, 0.1)
        assert config.training.dual_path is False and config.encoder.clip_dim == 32
    assert resolve_config("ablation").training.steps == 50_000
    assert resolve_config("default").training.steps == 150_000
    with pytest.raises(DATEncoderError, match="--set 'training.nope=1'"):
        resolve_config("tiny", None, ("training.nope=1",))
    with pytest.raises(DATEncoderError, match="embedding_regularization must be one of"):
        resolve_config("tiny", None, ("training.embedding_regularization=vq",))


def test_refusals_come_before_the_run(tmp_path):
    with pytest.raises(DATEncoderError, match="--base .*no such file"):
        main(["--base", str(tmp_path / "sd15.safetensors"), "--clip-vision", str(tmp_path / "vit.safetensors"),
              "--data", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DATEncoderError, match="holds no images"):
        main(["--preset", "tiny", "--data", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "out")])
    run = {"config": resolve_config("tiny").to_dict(), "data": ["skimage"]}
    checkpoints.write_run(tmp_path / "out", run)
    with pytest.raises(DATEncoderError, match=r"another configuration \(config.training.lr: 0.001 there, 0.01 now"):
        main(["--preset", "tiny", "--set", "training.lr=1e-2", "--output-dir", str(tmp_path / "out")])
    checkpoints.checkpoint_dir(tmp_path / "out", 20).mkdir(parents=True)
    with pytest.raises(DATEncoderError, match="holds checkpoints .*--resume auto"):
        main(["--preset", "tiny", "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "logs").exists()  # nothing started
