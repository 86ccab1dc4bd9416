"""Pretraining data at scale (training.data.streams, training.data.shards, training.data.decode and the preparation
commands): shards read by 2 processes x 2 workers see every sample once per epoch, resume continues
exactly, mixing weights hold, held-out images are never trained on, the OpenImages crop is the largest box
with its class, every bad-image kind is converted or skipped and counted without stopping a run (alpha
composited on white), an unreadable file is counted apart while a lost folder stops the run, and the
refusals name the path.

Images are made in code: image i is one flat colour that encodes i, so a batch row tells which image it
came from after any crop and resize."""

import csv
import errno
import io
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datencoder_core import DATEncoderError
from datencoder_core.images import to_rgb
from training.data import sources, streams
from training.data.decode import EVENTS, decode_image, describe
from training.data.shards import read_shard
from training.make_shards import make_shards
from training.pretrain.config import resolve_config
from training.prepare_openimages import prepare

REPO = Path(__file__).resolve().parents[1]


def colour(i: int) -> tuple[int, int, int]:
    return 10 + i % 200, 10 + i // 200, 77


def identify(images: torch.Tensor) -> list[int]:
    """Image ids of a batch (b, S, S, 3) of flat images made by ``colour``."""
    rgb = (images.mean(dim=(1, 2)) * 255).round().long()
    return [int(r - 10 + 200 * (g - 10)) for r, g, _ in rgb.tolist()]


def image_folder(root: Path, n: int, classes: int = 4, first: int = 0, size: int = 16) -> Path:
    for i in range(first, first + n):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size + i % 3, size), colour(i)).save(folder / f"img_{i}.png")
    return root


def stream(mix, rank=0, world=1, workers=0, batch=3, block=4, seed=0, start_step=0, resume=None, excluded=()):
    return streams.MixedStream(mix, image_size=8, seed=seed, local_batch=batch, rank=rank, world=world,
                               num_workers=workers, block=block, min_side=8, excluded=frozenset(excluded),
                               start_step=start_step, resume=resume)


def read(loader) -> list[list[int]]:
    return [identify(batch.images) for batch in loader]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """48 images in 4 ImageNet-style class folders -> 8 shards of 6 (make_shards, class names mapped)."""
    root = tmp_path_factory.mktemp("shards")
    image_folder(root / "imagenet", 48)
    (root / "synsets.txt").write_text("".join(f"n{c:08d} class{c}, other name\n" for c in range(4)))
    paths = make_shards(root / "imagenet", root / "out", root / "synsets.txt", per_shard=6, workers=1, seed=0)
    assert [p.name for p in paths] == [f"{i:05d}.tar" for i in range(8)]
    return root / "out"


def test_make_shards_keeps_every_image_with_its_class_name(shards):
    samples = [s for i in range(8) for s in read_shard(shards / f"{i:05d}.tar")]
    assert len(samples) == 48 and len({s["__key__"] for s in samples}) == 48
    for sample in samples:
        i = int(json.loads(sample["json"])["path"].split("_")[-1].split(".")[0])
        assert sample["txt"].decode() == f"class{i % 4}"
        assert Image.open(io.BytesIO(sample["png"])).getpixel((0, 0)) == colour(i)
    first = [json.loads(s["json"])["path"] for s in read_shard(shards / "00000.tar")]
    assert len({p.split("/")[0] for p in first}) > 1  # shuffled: a shard holds several classes


def test_two_processes_x_two_workers_read_every_sample_once_per_epoch(shards):
    """8 shards, 4 readers: one epoch is 48 samples = 8 steps of a global batch of 6. Over 2 epochs each
    image comes exactly twice, once in each epoch's half of the run, in another order the second time."""
    mix = sources.open_sources([f"{shards}/{{00000..00007}}.tar"])
    assert mix.streaming
    seen = {}
    for rank in (0, 1):
        loader = streams.StreamLoader(stream(mix, rank, world=2, workers=2), 2, global_batch=6, steps=16)
        batches = [batch for batch in loader]
        assert [b.positions.tolist() for b in batches] == [[6 * s + 3 * rank + r for r in range(3)] for s in range(16)]
        seen[rank] = [identify(b.images) for b in batches]
    for epoch in (0, 1):
        ids = [i for rank in (0, 1) for batch in seen[rank][8 * epoch:8 * epoch + 8] for i in batch]
        assert sorted(ids) == list(range(48)), epoch
    assert seen[0][:8] != seen[0][8:]


def test_held_out_images_are_never_trained_on_when_streaming(shards):
    """``training_data`` on shards, 2 processes x 2 workers, 16 steps of 6 (over 2 epochs of the 44 images
    left to train on): the 4 held-out keys are excluded from every reader, so no held-out image ever comes
    in a training batch, while every other image does."""
    from training.pretrain.config import resolve_config

    training = resolve_config("tiny", None, ("training.heldout_images=4", "training.batch_size=6", "training.steps=16",
                                             "training.num_workers=2", "training.shuffle_buffer=4",
                                             "training.min_image_side=8")).training
    mix = sources.open_sources([f"{shards}/{{00000..00007}}.tar"])
    assert mix.streaming
    trained, held = [], []
    for rank in (0, 1):
        loader, images, _ = streams.training_data(mix, 8, training, rank, 2, 0, None)
        held.append(identify(images))
        trained += [i for batch in loader for i in identify(batch.images)]
    assert held[0] == held[1] and len(set(held[0])) == 4
    _, _, keys = streams.heldout(mix, 4, training.seed, 8, 8)
    ids = {s["__key__"]: int(json.loads(s["json"])["path"].split("_")[-1].split(".")[0])
           for i in range(8) for s in read_shard(shards / f"{i:05d}.tar")}
    assert sorted(ids[k] for k in keys) == sorted(held[0])  # the excluded keys are the held-out images'
    assert len(trained) == 16 * 6
    assert not set(trained) & set(held[0]), sorted(set(trained) & set(held[0]))
    assert set(trained) == set(range(48)) - set(held[0])


def test_resume_mid_epoch_continues_without_repeats_or_gaps(shards):
    """Stopped after step 5 (odd: the other worker's turn) and resumed from the loader's state: the same
    batches as the straight run, across the epoch boundary (shuffle buffer 4 < a reader's 12 samples)."""
    mix = sources.open_sources([f"{shards}/{{00000..00007}}.tar"])
    straight = read(streams.StreamLoader(stream(mix, 1, world=2, workers=2), 2, global_batch=6, steps=12))
    first = streams.StreamLoader(stream(mix, 1, world=2, workers=2), 2, global_batch=6, steps=5)
    before = read(first)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    after = read(streams.StreamLoader(stream(mix, 1, world=2, workers=2, start_step=5, resume=state), 2,
                                      global_batch=6, steps=12))
    assert before + after == straight
    ids = [i for batch in straight for i in batch]
    assert len(set(ids[:24])) == 24  # one epoch of this process's readers: no repeats


def test_mixing_weights_are_the_shares_and_deterministic(tmp_path):
    a = image_folder(tmp_path / "a", 10)
    b = image_folder(tmp_path / "b", 10, first=100)
    mix = sources.open_sources([f"{a}@0.7", f"{b}@0.3"])
    assert mix.streaming and mix.weights == [0.7, 0.3]
    loader = streams.StreamLoader(stream(mix, batch=50, block=10), 0, global_batch=50, steps=30)
    ids = [i for batch in read(loader) for i in batch]
    share = sum(i < 100 for i in ids) / len(ids)
    assert abs(share - 0.7) < 0.03, share  # 1500 draws: 3 standard deviations is 0.035
    again = [i for batch in read(streams.StreamLoader(stream(mix, batch=50, block=10), 0, 50, 2)) for i in batch]
    other = [i for batch in read(streams.StreamLoader(stream(mix, batch=50, block=10, seed=1), 0, 50, 2)) for i in batch]
    assert again == ids[:100] and other != again
    with pytest.raises(DATEncoderError, match="weight after '@' must be a number > 0"):
        sources.open_sources([f"{a}@zero"])


def _bad_images(root: Path) -> dict[str, int]:
    """One file of each kind; returns the decode events they should give."""
    root.mkdir(parents=True)
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16)).save(root / "sixteen.png")
    Image.new("L", (40, 40), 128).save(root / "grey.png")
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([255, 0, 0] * 256)
    palette.save(root / "palette.png")
    Image.new("RGBA", (40, 40), (255, 0, 0, 128)).save(root / "rgba.png")  # half-transparent red
    Image.new("RGB", (5, 40), (1, 2, 3)).save(root / "tiny.png")
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole, "JPEG")
    (root / "truncated.jpg").write_bytes(whole.getvalue()[:400])
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole, "PNG")
    (root / "garbage.png").write_bytes(whole.getvalue()[:100] + bytes(200) + whole.getvalue()[300:])  # zeroed data
    (root / "notes.png").write_text("not an image")
    return {"converted_cmyk": 1, "converted_16bit": 1, "converted_grey": 1, "converted_palette": 1,
            "converted_rgba": 1, "skipped_too_small": 1, "skipped_corrupt": 2, "skipped_not_an_image": 1}


def test_each_bad_image_kind_is_converted_or_skipped_and_counted(tmp_path):
    expected = _bad_images(tmp_path / "bad")
    pixels = {p.stem: decode_image(p.read_bytes(), 8) for p in (tmp_path / "bad").iterdir()}
    assert {k: v.event for k, v in pixels.items()} == {
        "cmyk": "converted_cmyk", "sixteen": "converted_16bit", "grey": "converted_grey",
        "palette": "converted_palette", "rgba": "converted_rgba", "tiny": "skipped_too_small",
        "truncated": "skipped_corrupt", "garbage": "skipped_corrupt", "notes": "skipped_not_an_image"}
    assert pixels["sixteen"].pixels[0, 0].tolist() == pytest.approx([0.5] * 3, abs=1e-4)  # not clipped to white
    assert pixels["rgba"].pixels[0, 0].tolist() == pytest.approx([1.0, 127 / 255, 127 / 255])  # on white
    assert pixels["palette"].pixels[0, 0].tolist() == [1.0, 0.0, 0.0]
    assert pixels["cmyk"].pixels[0, 0].tolist() == [1.0, 0.0, 0.0]
    assert pixels["grey"].pixels.shape == (40, 40, 3)
    # the streaming path: one epoch (9 files, 5 usable) with an image that is fine
    Image.new("RGB", (40, 40), colour(3)).save(tmp_path / "bad" / "fine.png")
    mix = sources.open_sources([f"{tmp_path / 'bad'}@1"])
    batches = list(streams.StreamLoader(stream(mix, batch=6, block=100), 0, global_batch=6, steps=1))
    assert sum((b.events for b in batches), Counter()) == Counter(expected)
    # the exact path: the bad ones are replaced by the next image that decodes, and counted
    source = sources.ConcatSource(mix.sources)
    shard = sources.ProcessShard(source, list(range(len(source))), 8, 0, 10, 0, 1, 0, 1, min_side=8)
    batch = shard.__getitems__(list(range(10)))
    assert batch.images.shape == (10, 8, 8, 3) and sum(batch.events.values()) >= sum(expected.values())


def test_partial_alpha_is_composited_on_white_by_decode_and_to_rgb():
    """rgb * a + (1 - a), for every alpha, in the training decoder (file bytes, RGBA and grey + alpha) and in
    the nodes' ``to_rgb`` (IMAGE tensors): dropping alpha, or thresholding it, gives other numbers."""
    alpha = np.linspace(0, 255, 40).round().astype(np.uint8)  # one alpha per column, 0 ... 255
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = (200, 100, 0), alpha
    rgba[0, 0], rgba[0, 1] = (255, 0, 0, 128), (0, 0, 0, 64)  # half-transparent red, quarter-opaque black
    expected = rgba[..., :3] / 255 * (rgba[..., 3:] / 255) + (1 - rgba[..., 3:] / 255)
    for mode, pixels, wanted in (("RGBA", rgba, expected),
                                 ("LA", rgba[..., [0, 3]], np.repeat(expected[..., :1], 3, axis=-1))):
        payload = io.BytesIO()
        Image.fromarray(pixels, mode).save(payload, "PNG")
        decoded = decode_image(payload.getvalue(), 8)
        assert decoded.event == "converted_rgba", mode
        np.testing.assert_allclose(decoded.pixels, wanted, atol=1e-6, err_msg=mode)
    assert decoded.pixels[0, 0].tolist() == pytest.approx([1.0] * 3)  # grey 255 at alpha 128: white
    np.testing.assert_allclose(expected[0, :2], [[1.0, 127 / 255, 127 / 255], [191 / 255] * 3], atol=1e-12)

    images = torch.zeros(2, 8, 8, 4)
    images[0, ..., :3], images[0, ..., 3] = torch.tensor([1.0, 0.0, 0.0]), 0.5
    images[1, ..., :3], images[1, ..., 3] = torch.tensor([0.2, 0.4, 0.6]), 0.25
    images[1, 0, 0, 3] = 0.0  # one fully transparent pixel: white
    rgb = to_rgb(images)
    assert rgb.shape == (2, 8, 8, 3)
    torch.testing.assert_close(rgb[0, 3, 3], torch.tensor([1.0, 0.5, 0.5]))
    torch.testing.assert_close(rgb[1, 3, 3], torch.tensor([0.8, 0.85, 0.9]))
    torch.testing.assert_close(rgb[1, 0, 0], torch.tensor([1.0, 1.0, 1.0]))
    np.testing.assert_allclose(to_rgb(torch.from_numpy(rgba / 255.0)[None].float())[0].numpy(), expected, atol=1e-6)


def test_an_unreadable_file_is_reported_apart_and_a_lost_folder_stops_the_run(tmp_path, monkeypatch, caplog):
    """An OSError reading one file (a network hiccup): it is skipped, counted as ``skipped_unreadable`` (not
    as a bad image) and named in a warning, on both paths. When every read fails (a dropped mount) or the
    folder itself is gone, the first batch raises, naming the folder: not after thousands of skipped files."""
    root = image_folder(tmp_path / "photos", 40)
    broken = root / "n00000001" / "img_5.png"
    read_bytes, reads, every_read_fails = Path.read_bytes, [], []

    def flaky_read_bytes(path: Path) -> bytes:  # the one read call the sources make, failing like a bad NFS read
        reads.append(path)
        assert len(reads) < 1000, "1000 failed reads and still reading: the run would skip files forever"
        if path == broken or every_read_fails:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", flaky_read_bytes)
    assert "skipped_unreadable" in EVENTS
    # the streaming path: two epochs of the folder, every good image in them, the broken one never
    mix = sources.open_sources([f"{root}@1"])
    caplog.set_level("WARNING", logger="datencoder.data")
    batches = list(streams.StreamLoader(stream(mix, batch=39, block=100), 0, global_batch=39, steps=2))
    events = sum((b.events for b in batches), Counter())
    assert set(events) == {"skipped_unreadable"} and events["skipped_unreadable"] >= 1
    ids = [i for b in batches for i in identify(b.images)]
    assert 5 not in ids and set(ids) == set(range(40)) - {5}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings and all(f"cannot read {broken}" in w and "skipped_unreadable" in w for w in warnings)
    assert describe(events).startswith(f"unreadable {events['skipped_unreadable']} (")
    assert describe(events + Counter(skipped_corrupt=2)).endswith("; skipped 2 (corrupt 2)")  # bad images apart
    # the exact path: the broken image is replaced by the next that decodes, and counted as unreadable
    source = sources.ConcatSource(mix.sources)
    shard = sources.ProcessShard(source, list(range(40)), 8, 0, 40, 0, 1, 0, 1, min_side=8)
    batch = shard.__getitems__(list(range(40)))
    assert batch.events == Counter(skipped_unreadable=1) and 5 not in identify(batch.images)

    every_read_fails.append(True)  # the mount dropped: each file read now fails, the folder is still there

    def fresh():  # the folder opened again: no failed reads counted yet
        return sources.open_sources([f"{root}@1"])

    for name, read_a_batch in (("streaming", lambda: next(iter(stream(fresh(), batch=4)))),
                               ("exact", lambda: sources.ProcessShard(sources.ConcatSource(fresh().sources),
                                                                      list(range(40)), 8, 0, 4, 0, 1, 0, 1, 8)[0])):
        reads.clear()
        with pytest.raises(DATEncoderError, match=rf"--data {root}: cannot read .*16 files in a row could not be "
                                                  rf"read: is its disk or network mount still there"):
            read_a_batch()
        assert len(reads) == sources.UNREADABLE_IN_A_ROW, name  # at once, not after skipping every file
    every_read_fails.clear()
    shutil.rmtree(root)  # the folder itself is gone: the first failed read stops
    reads.clear()
    with pytest.raises(DATEncoderError, match=rf"--data {root}: cannot read .*the folder itself is gone"):
        next(iter(stream(mix, batch=4)))
    assert len(reads) == 1


def test_refusals_name_the_path(tmp_path):
    image_folder(tmp_path / "few", 6)
    make_shards(tmp_path / "few", tmp_path / "shards", None, 3, 1, 0)
    with pytest.raises(DATEncoderError, match=r"shard .*00002.tar does not exist \(2 of the 4"):
        sources.open_sources([f"{tmp_path}/shards/{{00000..00003}}.tar"])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"junk")
    with pytest.raises(DATEncoderError, match=r"--data .*junk: no usable image in it \(skipped_not_an_image: 1"):
        sources.check_sources(sources.open_sources([str(tmp_path / "junk")]), 8)
    with pytest.raises(DATEncoderError, match="2 units .* for 4 readers"):
        stream(sources.open_sources([f"{tmp_path}/shards/{{00000..00001}}.tar"]), world=2, workers=2)


def test_openimages_crops_the_largest_box_with_its_class(tmp_path):
    """Three images, several boxes each: the largest non-group box is cropped (its pixels, its class);
    a group-of box larger still is passed over; a box below --min-size skips its image; a rerun keeps the shards."""
    images = tmp_path / "images"
    images.mkdir()
    boxes = {  # image: [(label, xmin, xmax, ymin, ymax, group)], the largest non-group one painted
        "aaa": [("/m/cat", 0.1, 0.6, 0.2, 0.9, 0), ("/m/dog", 0.0, 0.2, 0.0, 0.2, 0), ("/m/crowd", 0, 1, 0, 1, 1)],
        "bbb": [("/m/dog", 0.5, 1.0, 0.5, 1.0, 0), ("/m/cat", 0.0, 0.3, 0.0, 0.3, 0)],
        "ccc": [("/m/dog", 0.0, 0.05, 0.0, 0.05, 0)],
    }
    for image_id, rows in boxes.items():
        pixels = np.zeros((100, 200, 3), dtype=np.uint8)
        _, x0, x1, y0, y1, _ = rows[0]
        pixels[round(y0 * 100):round(y1 * 100), round(x0 * 200):round(x1 * 200)] = (200, 40, 90)
        Image.fromarray(pixels).save(images / f"{image_id}.jpg", quality=98)
    with open(tmp_path / "boxes.csv", "w", newline="") as stream_:
        writer = csv.writer(stream_)
        writer.writerow(["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax", "IsOccluded",
                         "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"])
        for image_id, rows in boxes.items():
            for label, x0, x1, y0, y1, group in reversed(rows):
                writer.writerow([image_id, "xclick", label, 1, x0, x1, y0, y1, 0, 0, group, 0, 0])
    (tmp_path / "names.csv").write_text("/m/cat,Cat\n/m/dog,Dog\n/m/crowd,Crowd\n")
    args = [images, tmp_path / "boxes.csv", tmp_path / "out", tmp_path / "names.csv", 0.0, 16, 2, 1, 0]
    counts = prepare(*args)
    assert counts["written"] == 2 and counts["skipped_small_box"] == 1
    crops = {s["__key__"]: s for i in range(2) for s in read_shard(tmp_path / "out" / f"{i:05d}.tar")}
    assert sorted(crops) == ["aaa", "bbb"]
    for image_id, size, name in (("aaa", (100, 70), "Cat"), ("bbb", (100, 50), "Dog")):
        crop = Image.open(io.BytesIO(crops[image_id]["jpg"]))
        assert crop.size == size and crops[image_id]["txt"].decode() == name
        assert np.abs(np.asarray(crop, dtype=float).mean((0, 1)) - (200, 40, 90)).max() < 4
    assert prepare(*args)["kept_shards"] == 2  # resumable: complete shards are kept


def test_a_pretraining_run_on_mixed_shards_and_bad_images_goes_on_and_resumes_exactly(shards, tmp_path):
    """python -m training.pretrain --data SHARDS@0.5 --data BAD@0.5 (tiny, 4 steps, 2 workers): it ends, logs
    the bad images per kind, and its checkpoints hold each worker's read position; resumed from step 2
    (the step-4 checkpoint deleted), it ends with the straight run's encoder weights, exactly."""
    from safetensors.torch import load_file

    _bad_images(tmp_path / "bad")
    Image.new("RGB", (200, 200), colour(1)).save(tmp_path / "bad" / "fine.png")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "training.pretrain", "--preset", "tiny", "--output-dir", str(out),
               "--data", f"{shards}/{{00000..00007}}.tar@0.5", "--data", f"{tmp_path / 'bad'}@0.5",
               "--set", "training.steps=4", "--set", "training.validation_every=1000", "--set", "training.sample_images=0",
               "--set", "training.log_every=1", "--set", "training.num_workers=2", "--set", "training.min_image_side=8",
               "--set", "training.heldout_images=2", "--set", "training.shuffle_buffer=8",
               "--set", "training.checkpoint_every=2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data: skipped" in result.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "pretrain"))
    events.Reload()
    skipped = sum(events.Scalars(f"data/skipped_{k}")[-1].value for k in ("corrupt", "not_an_image", "too_small"))
    assert skipped > 0
    state = torch.load(out / "checkpoints" / "step-0000002" / "custom_checkpoint_1.pkl", weights_only=True)
    assert state["step"] == 2 and len(state["data"]) == 1 and len(state["data"][0]) == 2
    assert all(worker["draws"] >= 2 for worker in state["data"][0])
    straight = load_file(str(out / "checkpoints" / "step-0000004" / "encoder.safetensors"))
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    result = subprocess.run([*command, "--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = load_file(str(out / "checkpoints" / "step-0000004" / "encoder.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_latent_cache_holds_the_latents_of_the_crops_training_reads(tmp_path, tiny_models):
    """cache_latents (tiny VAE) beside 2 shards of textured images (a flat one leaves GroupNorm ill-conditioned);
    the streaming loader then yields the cached latents with the centre crops they were made from, and the
    objective's frozen half is the same with them as when it encodes the images itself."""
    from training.cache_latents import main as cache_latents
    from training.pretrain.config import resolve_config
    from training.pretrain.objective import PretrainingObjective

    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (24, 32 + i, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    make_shards(tmp_path / "photos", tmp_path / "shards", None, 4, 1, 0)
    spec = f"{tmp_path}/shards/{{00000..00001}}.tar"
    assert cache_latents(["--data", spec, "--models", "tiny", "--min-image-side", "8", "--batch", "3"]) == 8
    assert cache_latents(["--data", spec, "--models", "tiny"]) == 0  # complete caches are kept
    mix = sources.open_sources([spec])
    loader = streams.MixedStream(mix, image_size=tiny_models.image_size, seed=0, local_batch=4, rank=0, world=1,
                                 num_workers=0, block=8, min_side=8, excluded=frozenset())
    assert loader.use_latents
    batch = next(iter(loader))
    backend = tiny_models.backend()
    try:
        encoded = backend.encode_latents(batch.images)  # stored as float16: equal within 1 ulp of that
        assert ((batch.latents - encoded).abs() <= encoded.abs() * 2.0 ** -10 + 1e-6).all()
        objective = PretrainingObjective(backend, resolve_config("tiny"))
        positions = torch.arange(4)
        cached = objective.encoder_inputs(batch.images, positions, batch.latents)
        for a, b in zip(cached[:3], objective.encoder_inputs(batch.images, positions)[:3]):
            torch.testing.assert_close(a, b, atol=5e-3, rtol=1e-2)
    finally:
        backend.remove()


def test_min_crop_one_keeps_the_whole_image_and_lower_values_zoom():
    """``training.min_crop`` (square_crop): at 1 a random crop is the whole image, only flipped or not; at the default
    0.7 some crops are zoomed (the toy world trains with 1: its models never saw a crop)."""
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, :8] = 255  # left half white: a crop of the whole image is this or its mirror
    whole = sources.square_crop(pixels, 16, None)
    for seed in range(8):
        crop = sources.square_crop(pixels, 16, torch.Generator().manual_seed(seed), min_crop=1.0)
        assert torch.equal(crop, whole) or torch.equal(crop, whole.flip(1))
    zoomed = [sources.square_crop(pixels, 16, torch.Generator().manual_seed(seed))  # min_crop 0.7
              for seed in range(8)]
    assert any(not (torch.allclose(c, whole, atol=1e-3) or torch.allclose(c, whole.flip(1), atol=1e-3))
               for c in zoomed)
    with pytest.raises(DATEncoderError, match="training.min_crop must be in"):
        resolve_config("tiny", None, ("training.min_crop=0",))
