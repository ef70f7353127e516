"""Latent caching for text-to-image: caption embeddings, aspect-ratio buckets, flipped latents,
non-finite latents and the threaded decode path (real Ray, real S3 endpoint, tiny real models)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import encode_image, photo_crops, write_tar
from pipeline.config import ConfigError
from pipeline.io import buckets, imaging, manifest, storage
from pipeline.io.checkpoint import CheckpointError
from pipeline.io.tarshards import Sample, iter_samples
from pipeline.models import autoencoder, text
from pipeline.stages import encode, encode_worker
from pipeline.stages.encode import EncodeConfig, run_encode
from pipeline.stages.encode_worker import encode_shard, prepare_sample
from pipeline.stages.inspect import InspectConfig, inspect

CAPTIONS = {
    "portrait": "a photo of a tall tower",
    "landscape": "a photo of a wide field",
    "square": "a photo of coffee",
    "wide": "a photo of a long train",
    "panorama": "a panorama of the sea",
    "tall": "a photo of a tree",
    "nocap": None,
    "long": "a photo of " + " ".join(["red"] * 30),
}
SIZES = {
    "portrait": (64, 128),
    "landscape": (128, 64),
    "square": (96, 96),
    "wide": (160, 80),
    "panorama": (300, 60),  # 5:1, beyond --max-aspect 4
    "tall": (60, 180),
    "nocap": (80, 80),
    "long": (128, 96),
}


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Tiny random CLIP and T5 text encoders with word-level tokenizers, built offline."""
    root = tmp_path_factory.mktemp("text")
    corpus = [c for c in CAPTIONS.values() if c]
    return {
        "clip": text.build_stand_in(str(root / "clip"), corpus, kind="clip", seed=1),
        "t5": text.build_stand_in(str(root / "t5"), corpus, kind="t5", seed=2),
        "clip_other": text.build_stand_in(str(root / "clip_other"), corpus, kind="clip", seed=5),
    }


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vae") / "tiny")
    autoencoder.save_kl(autoencoder.new_kl("tiny", seed=3)[0], path)
    return path


def _members() -> list[tuple[str, bytes]]:
    crops = photo_crops(len(SIZES), size=180, seed=4)
    out = []
    for (key, size), crop in zip(SIZES.items(), crops):
        fmt = "JPEG" if key != "square" else "PNG"
        out.append((f"{key}.{'jpg' if fmt == 'JPEG' else 'png'}", encode_image(crop.resize(size), fmt, quality=95)))
        if CAPTIONS[key]:
            out.append((f"{key}.txt", CAPTIONS[key].encode()))
    return out


# --------------------------------------------------------------------------- units


def test_bucket_table_covers_both_orientations_within_limits():
    table = buckets.generate(64 * 64, 16, 4.0)
    assert (64, 64) in table and (32, 128) in table and (128, 32) in table
    for w, h in table:
        assert w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64 and buckets.aspect(w, h) <= 4.0
        assert w * h > 64 * 64 - 16 * max(w, h)  # the largest height per width: area within one row
    assert buckets.nearest(table, 600, 300) == (80, 48)  # 5:3 is nearer 2:1 than 3:1
    assert buckets.nearest(table, 300, 600) == (48, 80)
    assert buckets.nearest(table, 500, 500) == (64, 64)
    with pytest.raises(buckets.BucketError, match="smaller than one"):
        buckets.generate(100, 16, 2.0)


def test_bucket_file_is_checked():
    assert buckets.parse(b"[[64, 32], [32, 64]]", 16, "t.json") == [(32, 64), (64, 32)]
    for bad, msg in [
        (b"{", "not valid JSON"),
        (b"[]", "non-empty"),
        (b"[[64, 30]]", "not a multiple of 16"),
        (b"[[64, 32], [64, 32]]", "twice"),
        (b'[["a", 2]]', "positive integers"),
        (b"[[16384, 64]]", "over 8192 px"),
        (b"[[256, 32]]", "beyond --max-aspect 4"),
    ]:
        with pytest.raises(buckets.BucketError, match=msg):
            buckets.parse(bad, 16, "t.json", max_aspect=4.0)


def test_jpeg_draft_decodes_smaller_but_never_below_the_need():
    photo = photo_crops(1, size=512, seed=1)[0]
    data = encode_image(photo, "JPEG", quality=95)
    full, size = imaging.decode_for(data)
    small, size2 = imaging.decode_for(data, plan=lambda w, h: (128, 128))
    assert size == size2 == (512, 512) and full.size == (512, 512)
    assert small.size == (128, 128)  # 1/4 scale in the DCT domain
    assert imaging.decode_for(data, plan=lambda w, h: (200, 200))[0].size == (256, 256)
    assert imaging.decode_for(data, plan=lambda w, h: (300, 300))[0].size == (512, 512)  # < 2x: full decode
    a, _ = imaging.resize_cover(full, (128, 64))
    b, box = imaging.resize_cover(small, (128, 64), (512, 512))
    assert box == (0, 128, 512, 384)
    err = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    psnr = 10 * math.log10(255**2 / np.mean(err**2))
    assert psnr > 30, psnr  # the same picture, from a slightly different decode


def test_stored_embedding_is_the_encoders_output_on_the_unpadded_caption(encoders):
    for kind in ("clip", "t5"):
        te = text.TextEncoder(encoders[kind])
        captions = ["a photo of coffee", "a panorama of the sea at night " * 3, ""]
        batch = te.encode(captions)
        for cap, emb in zip(captions, batch):
            ids = te.tokenizer(cap, truncation=True, max_length=te.max_tokens, return_tensors="pt")
            with torch.no_grad():
                own = te.model(input_ids=ids["input_ids"]).last_hidden_state[0].numpy()  # no padding, no mask
            assert emb.hidden.shape == own.shape and emb.hidden.dtype == np.float16
            np.testing.assert_allclose(emb.hidden.astype(np.float32), own, atol=2e-3)
        assert [e.truncated for e in batch] == [False, True, False]
        assert (batch[0].pooled is not None) == (kind == "clip")


def test_a_text_encoder_whose_weights_do_not_match_its_config_is_refused(encoders, tmp_path):
    """transformers would fill the missing weights with random values and only warn."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(encoders["clip"], bad)
    shutil.copy(os.path.join(encoders["t5"], "config.json"), bad / "config.json")
    with pytest.raises(CheckpointError, match="weights do not match T5EncoderModel"):
        text.TextEncoder(str(bad))


def test_caption_field_of_an_unreadable_json_is_a_bad_caption(encoders, vae_path):
    cfg = EncodeConfig(
        input="x.tar", output="/tmp/o", vae=vae_path, text_encoder=[encoders["clip"]], caption_field="caption"
    )
    fields = {"png": encode_image(photo_crops(1, 64)[0]), "json": b"{not json"}
    with pytest.raises(imaging.BadImage, match="bad_caption"):
        prepare_sample(Sample("k", fields), cfg)
    fields["json"] = b'{"caption": 3}'
    with pytest.raises(imaging.BadImage, match="bad_caption"):
        prepare_sample(Sample("k", fields), cfg)
    fields["json"] = b'{"caption": "a photo of coffee"}'
    assert prepare_sample(Sample("k", fields), cfg).caption == "a photo of coffee"


# --------------------------------------------------------------------------- the job


def test_encode_captions_buckets_and_flips(tmp_path, bucket, ray_cluster, encoders, vae_path):
    encode_worker._TEXT_ENCODERS.clear()  # this process's cache: it must stay empty (see the end)
    write_tar(str(tmp_path / "s.tar"), _members())
    storage.put_file(str(tmp_path / "s.tar"), f"{bucket}/img/s.tar")
    for kind in ("clip", "t5"):  # text encoders are read through the storage module like any input
        storage.upload_dir(encoders[kind], f"{bucket}/text/{kind}")
    cfg = EncodeConfig(
        input=f"{bucket}/img/s.tar",
        output=f"{bucket}/lat",
        vae=vae_path,
        resolution=64,
        batch_size=2,
        buckets="auto",
        bucket_multiple=16,
        max_aspect=4.0,
        flip=True,
        text_encoder=[f"{bucket}/text/clip", f"{bucket}/text/t5"],
    )
    man = run_encode(cfg)
    tot = man["totals"]
    assert tot == {"seen": 8, "written": 7, "skipped": {"aspect_out_of_range": 1}}
    assert man["latent_shape"] is None and man["flip"] is True
    by_size = {tuple(b["size"]): b for b in man["buckets"]}
    assert sum(b["samples"] for b in man["buckets"]) == 7
    assert all(b["latent_shape"] == [4, b["size"][1] // 4, b["size"][0] // 4] for b in man["buckets"])
    assert [te["name"] for te in man["text_encoders"]] == ["clip", "t5"]
    assert man["text_encoders"][0]["pooled_field"] == "pooled_clip.npy"
    assert man["text_encoders"][1]["pooled_field"] is None
    assert man["captions"]["empty_embedded"] == 1 and man["captions"]["truncated"] == {"clip": 1, "t5": 1}
    errors = storage.read_bytes(f"{bucket}/lat/{manifest.ERRORS_NAME}").decode().splitlines()
    assert [json.loads(e)["key"] for e in errors] == ["panorama"]

    with storage.open_read(f"{bucket}/lat/s.tar") as f:
        samples = {s.key: s.fields for s in iter_samples(f)}
    assert set(samples) == set(SIZES) - {"panorama"}
    tes = {k: text.TextEncoder(encoders[k]) for k in ("clip", "t5")}
    vae = autoencoder.load(vae_path)
    members = dict(_members())
    for key, fields in samples.items():
        meta = json.loads(fields["json"])
        bw, bh = meta["bucket"]
        w, h = SIZES[key]
        assert (bw > bh) == (w > h) and (bw == bh) == (w == h), (key, meta["bucket"])
        assert buckets.nearest(list(by_size), w, h) == (bw, bh)
        lat = _npy(fields["latent.npy"])
        assert lat.shape == (4, bh // 4, bw // 4) and _npy(fields["latent_flip.npy"]).shape == lat.shape
        cap = CAPTIONS[key] or ""
        for name, te in tes.items():
            want = te.encode([cap])[0]
            got = _npy(fields[f"text_{name}.npy"])
            assert got.shape == want.hidden.shape == (meta["text"][name]["tokens"], 32)
            np.testing.assert_allclose(got.astype(np.float32), want.hidden.astype(np.float32), atol=2e-3)
            assert meta["text"][name]["truncated"] == (key == "long")
        assert ("pooled_clip.npy" in fields) and ("pooled_t5.npy" not in fields)
        # the flipped latent is the autoencoder's output on the mirror image of the same crop
        ext = "png" if key == "square" else "jpg"
        p = prepare_sample(Sample(key, {ext: members[f"{key}.{ext}"]}), cfg, list(by_size))
        crop = Image.fromarray(p.pixels)
        mirror = imaging.to_tensor_array(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        want_flip = vae.encode(torch.from_numpy(mirror[None])).mean[0].numpy()
        np.testing.assert_allclose(_npy(fields["latent_flip.npy"]).astype(np.float32), want_flip, atol=2e-2)
        want_lat = vae.encode(torch.from_numpy(imaging.to_tensor_array(crop)[None])).mean[0].numpy()
        np.testing.assert_allclose(lat.astype(np.float32), want_lat, atol=2e-2)
    empty = man["text_encoders"][0]["empty_caption"]
    stored_empty = _npy(storage.read_bytes(f"{bucket}/lat/{empty['hidden']}"))
    np.testing.assert_array_equal(stored_empty, tes["clip"].encode([""])[0].hidden)

    info = inspect(InspectConfig(url=f"{bucket}/lat", verify=True))  # shapes checked against the buckets
    assert info["verified_shards"] == 1 and [t["name"] for t in info["text_encoders"]] == ["clip", "t5"]
    assert sum(b["samples"] for b in info["buckets"]) == 7

    # every output is readable by webdataset and by Ray Data
    import ray
    import webdataset as wds

    local = str(tmp_path / "lat.tar")
    storage.write_bytes(local, storage.read_bytes(f"{bucket}/lat/s.tar"))
    assert sum(1 for _ in wds.WebDataset(local, shardshuffle=False)) == 7
    rows = ray.data.read_webdataset(local).take_all()
    assert len(rows) == 7 and all("text_clip.npy" in r and "latent_flip.npy" in r for r in rows)

    # a re-run with the same settings resumes; another text encoder or bucket table is refused
    again = run_encode(cfg)
    assert again["shards"] == man["shards"]
    storage.upload_dir(encoders["clip_other"], f"{bucket}/text/clip_other")

    with pytest.raises(ConfigError, match="other settings"):
        run_encode(dataclasses.replace(cfg, text_encoder=[f"{bucket}/text/clip_other", f"{bucket}/text/t5"]))
    storage.write_bytes(f"{bucket}/table.json", b"[[64, 64], [96, 48], [48, 96]]")
    with pytest.raises(ConfigError, match="other settings"):
        run_encode(dataclasses.replace(cfg, buckets=f"{bucket}/table.json"))
    # the driver never held a text encoder (its identities and the empty caption came from a worker)
    assert encode_worker._TEXT_ENCODERS == {}


def test_a_wrong_text_encoder_fails_the_job_in_one_line_before_any_shard(tmp_path, ray_cluster, encoders, vae_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(encoders["clip"], bad)
    shutil.copy(os.path.join(encoders["t5"], "config.json"), bad / "config.json")
    write_tar(str(tmp_path / "s.tar"), _members())
    cfg = EncodeConfig(
        input=str(tmp_path / "s.tar"), output=str(tmp_path / "o"), vae=vae_path, resolution=64, text_encoder=[str(bad)]
    )
    with pytest.raises(CheckpointError, match="weights do not match T5EncoderModel") as err:
        run_encode(cfg)
    assert type(err.value) is CheckpointError and "\n" not in str(err.value)  # the cause itself, one line
    assert not (tmp_path / "o" / "s.tar").exists()


def _overflowing_vae(path: str, hot: np.ndarray, cool: np.ndarray) -> None:
    """A real autoencoder whose latents overflow float16 storage for ``hot`` only (as fp16
    encoders do on some inputs): one mean channel is scaled between the two images' peaks."""
    model, _ = autoencoder.new_kl("tiny", seed=3)
    head = model.encoder[-1]
    with torch.no_grad():
        peaks = [model.encode(torch.from_numpy(x[None])).mean.abs().amax(dim=(0, 2, 3)) for x in (hot, cool)]
        c = int(torch.argmax(peaks[0] / peaks[1]))
        assert peaks[0][c] > 1.3 * peaks[1][c], peaks  # the test images differ enough
        k = 65504.0 / math.sqrt(peaks[0][c] * peaks[1][c])
        head.weight[c] *= k
        head.bias[c] *= k
    autoencoder.save_kl(model, path)


def test_non_finite_latents_and_missing_captions_are_skipped_with_reasons(tmp_path, ray_cluster, encoders):
    photo = photo_crops(1, size=64, seed=2)[0]
    black = Image.new("RGB", (64, 64))
    vae = str(tmp_path / "vae")
    _overflowing_vae(vae, imaging.to_tensor_array(photo), imaging.to_tensor_array(black))
    members = [
        ("hot.png", encode_image(photo)),
        ("hot.txt", b"a photo of coffee"),
        ("ok.png", encode_image(black)),
        ("ok.txt", b"a photo of coffee"),
        ("nocap.png", encode_image(black)),
    ]
    (tmp_path / "in").mkdir()
    write_tar(str(tmp_path / "in" / "a.tar"), members)
    man = run_encode(
        EncodeConfig(
            input=str(tmp_path / "in" / "a.tar"),
            output=str(tmp_path / "out"),
            vae=vae,
            resolution=64,
            text_encoder=[encoders["t5"]],
            empty_caption="skip",
            max_error_rate=1.0,
        )
    )
    assert man["totals"] == {"seen": 3, "written": 1, "skipped": {"no_caption": 1, "non_finite_latent": 1}}
    errors = [json.loads(line) for line in open(tmp_path / "out" / manifest.ERRORS_NAME)]
    assert {e["key"]: e["reason"] for e in errors} == {"hot": "non_finite_latent", "nocap": "no_caption"}
    with open(tmp_path / "out" / "a.tar", "rb") as f:
        (only,) = list(iter_samples(f))
    assert only.key == "ok" and np.isfinite(_npy(only.fields["latent.npy"])).all()


def test_outputs_do_not_depend_on_decode_threads(tmp_path, vae_path):
    """The pool decodes out of order; samples are still taken in tar order (no Ray needed)."""
    crops = photo_crops(9, size=200, seed=7)
    members = [
        (f"k{i}.jpg", encode_image(c.resize((200 + 8 * i, 160)), "JPEG", quality=90)) for i, c in enumerate(crops)
    ]
    write_tar(str(tmp_path / "a.tar"), members)
    digests = []
    for threads in (1, 3):
        out = tmp_path / f"out{threads}"
        cfg = EncodeConfig(
            input=str(tmp_path / "a.tar"), output=str(out), vae=vae_path, resolution=64, batch_size=4,
            decode_threads=threads, buckets="auto", bucket_multiple=16,
        )  # fmt: skip
        table = buckets.generate(64 * 64, 16, 4.0)
        plan = encode_worker.EncodePlan("fp", table, [])
        storage.write_json(storage.join(str(out), encode.SETTINGS_NAME), {"fingerprint": "fp"})
        rec = encode_shard(cfg, str(tmp_path / "a.tar"), str(out / "a.tar"), str(out / "_shards" / "a.tar.json"), plan)
        assert rec["written"] == 9 and sum(rec["buckets"].values()) == 9
        digests.append(rec["sha256"])
    assert digests[0] == digests[1]


def test_device_decoder_matches_pillow_and_skips_a_broken_jpeg(tmp_path, vae_path):
    """``--decoder torchvision`` (nvjpeg on CUDA; the same call on CPU here)."""
    crops = photo_crops(4, size=200, seed=9)
    good = [encode_image(c.resize((240, 160)), "JPEG", quality=92) for c in crops]
    members = [(f"k{i}.jpg", d) for i, d in enumerate(good)] + [("broken.jpg", good[0][: len(good[0]) // 2])]
    members.append(("png.png", encode_image(crops[0])))  # not a JPEG: Pillow decodes it
    write_tar(str(tmp_path / "a.tar"), members)
    base = EncodeConfig(input=str(tmp_path / "a.tar"), output=str(tmp_path / "o"), vae=vae_path, resolution=64)
    dev = dataclasses.replace(base, decoder="torchvision")
    for i, data in enumerate(good):
        want = prepare_sample(Sample(f"k{i}", {"jpg": data}), base).pixels
        p = prepare_sample(Sample(f"k{i}", {"jpg": data}), dev)
        assert p.pixels is None and p.box == (40, 0, 200, 160)
        (got,) = encode_worker._device_decode([p], "cpu", [])
        assert got.pixels.dtype == torch.uint8 and got.pixels.shape == want.shape == (64, 64, 3)
        err = got.pixels.numpy().astype(np.float32) - want
        assert 10 * math.log10(255**2 / float(np.mean(err**2))) > 30  # bicubic-antialias vs Lanczos
    plan = encode_worker.EncodePlan("fp", None, [])
    storage.write_json(str(tmp_path / "o" / encode.SETTINGS_NAME), {"fingerprint": "fp"})
    rec = encode_shard(
        dev, str(tmp_path / "a.tar"), str(tmp_path / "o" / "a.tar"), str(tmp_path / "o" / "r.json"), plan
    )
    assert (rec["seen"], rec["written"], rec["skipped"]) == (6, 5, {"corrupt_image": 1})
    assert rec["errors"][0]["key"] == "broken"
    vae = autoencoder.load(vae_path)
    assert encode.settings_fingerprint(base, vae.identity) != encode.settings_fingerprint(dev, vae.identity)
