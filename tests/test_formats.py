"""On-disk formats: the latent manifest, checkpoint directories, and the shard streams (no Ray, no S3)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from helpers import add_member, write_tar
from pipeline.io import checkpoint, manifest, storage
from pipeline.io.checkpoint import CheckpointError, CheckpointInfo
from pipeline.io.manifest import ManifestError
from pipeline.io.tarshards import TarShardWriter, iter_samples
from pipeline.train.streams import Batch, BatchStream, latent_stream, rank_shards


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _record(shard: str, samples: int, *, skipped: dict[str, int] | None = None, errors: list | None = None) -> dict:
    skipped = skipped or {}
    return {
        "shard": shard,
        "samples": samples,
        "bytes": 1000 + samples,
        "sha256": "0" * 64,
        "seen": samples + sum(skipped.values()),
        "written": samples,
        "skipped": skipped,
        "errors": errors or [],
    }


def _build(records: list[dict], latent_shape: list[int] | None = None, tasks: list[str] | None = None) -> dict:
    return manifest.build(
        records,
        encoder={"kind": "kl", "sha256": "ab" * 32},
        scale=0.5,
        shift=1.0,
        latent_shape=latent_shape or [4, 2, 2],
        latent_dtype="float16",
        preprocessing={"resolution": 16},
        tasks=tasks or [],
        config={"batch_size": 8},
    )


# --------------------------------------------------------------------------- manifest


def test_manifest_build_write_load_round_trip(tmp_path):
    errors = [{"key": "img_3", "reason": "corrupt_image", "detail": "truncated"}]
    records = [
        _record("shard-000000.tar", 5, skipped={"corrupt_image": 1, "too_small": 2}, errors=errors),
        _record("shard-000001.tar", 3, skipped={"corrupt_image": 1}),
    ]
    man = _build(records, tasks=["upscale2"])
    assert man["totals"] == {"seen": 12, "written": 8, "skipped": {"corrupt_image": 2, "too_small": 2}}
    assert man["fields"] == ["latent.npy", "std.npy", "json", "upscale2.npy"]
    assert [s["name"] for s in man["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    manifest.write(str(tmp_path), man, records)
    assert manifest.load(str(tmp_path)) == man
    lines = (tmp_path / manifest.ERRORS_NAME).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"shard": "shard-000000.tar", **errors[0]}]
    assert manifest.shard_urls(str(tmp_path), man) == [
        f"{tmp_path}/shard-000000.tar",
        f"{tmp_path}/shard-000001.tar",
    ]


def test_manifest_build_refuses_inconsistent_counts():
    rec = _record("s.tar", 4, skipped={"corrupt_image": 1})
    rec["seen"] = 7
    with pytest.raises(AssertionError, match=r"seen != written \+ skipped"):
        _build([rec])


def _write_manifest(root, man) -> None:
    (root / manifest.MANIFEST_NAME).write_text(json.dumps(man))


def test_manifest_load_refuses_missing_or_broken_files(tmp_path):
    with pytest.raises(ManifestError, match=r"has no _manifest\.json: not a finished latent dataset"):
        manifest.load(str(tmp_path))
    (tmp_path / manifest.MANIFEST_NAME).write_text('{"format": "latent-shards/1", ')
    with pytest.raises(ManifestError, match="is not valid JSON"):
        manifest.load(str(tmp_path))


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda m: m.update(format="latent-shards/0"), r"format 'latent-shards/0', expected 'latent-shards/1'"),
        (lambda m: m.pop("scale"), r"lacks \['scale'\]"),
        (lambda m: m["totals"].update(seen=m["totals"]["seen"] + 1), r"totals inconsistent"),
        (lambda m: m["shards"][0].update(samples=m["shards"][0]["samples"] + 1), "do not add up to the total"),
        (
            lambda m: m.update(shards=[], totals={"seen": 0, "written": 0, "skipped": {}}),
            "lists no shards",
        ),
    ],
)
def test_manifest_load_refuses_inconsistent_manifests(tmp_path, breakage, message):
    records = [_record("a.tar", 3, skipped={"not_an_image": 1}), _record("b.tar", 2)]
    man = _build(records)
    manifest.write(str(tmp_path), man, records)
    manifest.load(str(tmp_path))  # fine before the breakage
    breakage(man)
    _write_manifest(tmp_path, man)
    with pytest.raises(ManifestError, match=message) as err:
        manifest.load(str(tmp_path))
    assert err.type is ManifestError


# --------------------------------------------------------------------------- checkpoint


def _info(**kw) -> CheckpointInfo:
    base = {
        "kind": "diffusion",
        "model": {"widths": [32, 64], "groups": 8},
        "step": 120,
        "scale": 0.18,
        "shift": -0.25,
        "train": {"lr": 1e-4},
        "metrics": {"loss": 0.5},
        "optimizer": {"param_groups": [{"lr": 1e-4}]},
        "task": "upscale2",
        "latent_shape": [4, 8, 8],
        "residual_scale": 2.0,
        "vae_identity": {"sha256": "cd" * 32},
        "latents": "s3://bucket/latents",
    }
    return CheckpointInfo(**{**base, **kw})


def test_checkpoint_info_json_round_trip():
    info = _info()
    text = info.to_json()
    assert json.loads(text)["format"] == checkpoint.FORMAT
    assert CheckpointInfo.from_json(text) == info
    assert CheckpointInfo.from_json(text.encode()) == info
    minimal = CheckpointInfo(kind="autoencoder", model={"kind": "kl"})
    assert CheckpointInfo.from_json(minimal.to_json()) == minimal


def _json_without(key: str) -> str:
    d = json.loads(_info().to_json())
    del d[key]
    return json.dumps(d)


def _json_with(**kw) -> str:
    return json.dumps({**json.loads(_info().to_json()), **kw})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_json_with(format="latent-pipeline-checkpoint/1"), r"checkpoint format 'latent-pipeline-checkpoint/1'"),
        (_json_without("format"), r"checkpoint format None"),
        (_json_with(ema_decay=0.999, zzz=1), r"unknown fields \['ema_decay', 'zzz'\]"),
        (_json_without("model"), r"is incomplete .*model"),
        (_json_without("kind"), r"is incomplete .*kind"),
        (b"\x80\x81\xfe not json", "is not valid JSON"),
        (b"{'kind': 'diffusion'}", "is not valid JSON"),
        ("[1, 2, 3]", "is not a JSON object"),
        (
            json.dumps({"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "latent_channels": 4}),
            "is a diffusers AutoencoderKL folder, not a latent-pipeline checkpoint",
        ),
        (_json_with(kind="vae"), r"unknown checkpoint kind 'vae'"),
    ],
)
def test_checkpoint_info_refuses_bad_config(text, message):
    with pytest.raises(CheckpointError, match=message) as err:
        CheckpointInfo.from_json(text, where="ckpt-x")
    assert err.type is CheckpointError
    if "unknown checkpoint kind" not in message:  # raised by __post_init__, which has no location
        assert str(err.value).startswith("ckpt-x")


def _linear(seed: int, shape: tuple[int, int] = (3, 2)) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(*shape)


def test_save_and_load_round_trip(tmp_path):
    d = str(tmp_path / "ckpt")
    src, ema = _linear(0), _linear(1)
    info = _info(kind="autoencoder", task="", latent_shape=[])
    checkpoint.save(d, info, {"model": src.state_dict(), "ema": ema.state_dict()})
    assert sorted(os.listdir(d)) == ["config.json", "ema.safetensors", "model.safetensors"]
    assert checkpoint.read_info(d) == info
    tensors = checkpoint.load_tensors(d, "model")
    assert sorted(tensors) == ["bias", "weight"]
    torch.testing.assert_close(tensors["weight"], src.weight.detach())
    dst = _linear(2)
    assert not torch.equal(dst.weight, ema.weight)
    checkpoint.load_weights(dst, d, "ema")
    torch.testing.assert_close(dst.weight, ema.weight)
    torch.testing.assert_close(dst.bias, ema.bias)
    with pytest.raises(CheckpointError, match=r"checkpoint has no optimizer\.safetensors"):
        checkpoint.load_tensors(d, "optimizer")
    with pytest.raises(CheckpointError, match=r"is not a checkpoint: no config\.json"):
        checkpoint.read_info(str(tmp_path))


def test_load_weights_into_another_shape_is_refused(tmp_path):
    d = str(tmp_path / "ckpt")
    checkpoint.save(d, _info(), {"ema": _linear(0).state_dict()})
    with pytest.raises(CheckpointError, match=r"ema\.safetensors does not fit the recorded architecture") as err:
        checkpoint.load_weights(_linear(0, (4, 2)), d, "ema")
    assert err.type is CheckpointError


def test_load_refuses_the_other_kind(tmp_path):
    d = str(tmp_path / "vae")
    info = _info(kind="autoencoder")
    checkpoint.save(d, info, {"ema": _linear(0).state_dict()})
    local, got = checkpoint.load(d, "autoencoder")
    assert os.path.samefile(local, d) and got == info
    with pytest.raises(CheckpointError, match="is an autoencoder checkpoint, not a diffusion checkpoint"):
        checkpoint.load(d, "diffusion")
    checkpoint.save(str(tmp_path / "gen"), _info(), {})
    with pytest.raises(CheckpointError, match="is a diffusion checkpoint, not an autoencoder checkpoint"):
        checkpoint.load(str(tmp_path / "gen"), "autoencoder")


def test_latest_checkpoint_picks_the_newest_complete_one(tmp_path):
    run = tmp_path / "out" / checkpoint.RUN_NAME
    for step in (10, 20):
        (run / f"checkpoint_{step:08d}").mkdir(parents=True)
        (run / f"checkpoint_{step:08d}" / "config.json").write_text(_info(step=step).to_json())
    (run / "checkpoint_00000030").mkdir()  # newest, but unfinished: no config.json
    (run / "checkpoint_00000030" / "ema.safetensors").write_bytes(b"partial")
    (run / "not_a_checkpoint_99").mkdir()
    out = str(tmp_path / "out")
    latest = checkpoint.latest_checkpoint(out)
    assert latest == storage.join(out, "run", "checkpoint_00000020")
    # a checkpoint directory itself is its own latest
    assert checkpoint.latest_checkpoint(latest) == latest
    _, info = checkpoint.load(out, "diffusion")
    assert info.step == 20


def test_latest_checkpoint_of_an_empty_folder_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at or under") as err:
        checkpoint.latest_checkpoint(str(tmp_path))
    assert err.type is CheckpointError
    (tmp_path / "run" / "checkpoint_00000005").mkdir(parents=True)  # only an unfinished one
    with pytest.raises(CheckpointError, match="no checkpoint at or under"):
        checkpoint.latest_checkpoint(str(tmp_path))


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize(("n_shards", "world"), [(8, 2), (8, 4), (6, 3), (4, 1), (5, 2), (7, 3), (3, 4), (1, 2)])
def test_rank_shards_are_disjoint_and_equal_in_count(n_shards, world):
    shards = [f"s{i}.tar" for i in range(n_shards)]
    per_rank = -(-n_shards // world)
    for epoch in range(3):
        mine = [rank_shards(shards, r, world, epoch, seed=7) for r in range(world)]
        assert all(len(m) == per_rank for m in mine)
        assert all(set(m) <= set(shards) for m in mine)
        assert set().union(*mine) == set(shards)  # every shard is read every epoch
        assert mine == [rank_shards(shards, r, world, epoch, seed=7) for r in range(world)]  # deterministic
        if n_shards % world == 0:
            flat = [s for m in mine for s in m]
            assert sorted(flat) == sorted(shards)  # disjoint: each shard exactly once
        else:
            dealt = [m[: len(shards[r::world])] for r, m in enumerate(mine)]  # the round-robin part
            flat = [s for m in dealt for s in m]
            assert sorted(flat) == sorted(shards)
    orders = {tuple(rank_shards(shards, 0, 1, epoch, seed=7)) for epoch in range(6)}
    if n_shards >= 4:
        assert len(orders) > 1  # reshuffled between epochs


def _write_shard(path, keys: list[str], shape=(4, 2, 2)) -> dict[str, np.ndarray]:
    """A shard of samples ``{"latent.npy", "id.txt"}``; returns key -> latent."""
    latents = {}
    with open(path, "wb") as f, TarShardWriter(f) as w:
        for i, key in enumerate(keys):
            z = (np.arange(np.prod(shape)).reshape(shape) + 10 * i).astype(np.float16)
            latents[key] = z
            w.write(key, {"latent.npy": _npy(z), "id.txt": key.encode()})
    return latents


def _collate(items, rng):
    return {
        "keys": [s["id.txt"].decode() for s in items],
        "x": np.stack([np.load(io.BytesIO(s["latent.npy"])) for s in items]),
    }


def _take(stream: BatchStream, n: int) -> list:
    try:
        return [next(stream) for _ in range(n)]
    finally:
        stream.close()


def _tarfile_shard(samples: list[tuple[str, dict[str, bytes]]], head: bytes) -> bytes:
    """The same samples written by ``tarfile`` with the writer's fixed fields."""
    f = io.BytesIO(head)
    f.seek(len(head))
    with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return f.getvalue()


@pytest.mark.parametrize("head", [b"", b"xyz"])
def test_shard_writer_writes_tarfiles_own_bytes(head):
    """The writer's template headers (short ASCII names) and PAX headers (long or non-ASCII
    names) are byte for byte what ``tarfile`` writes, and ``iter_samples`` reads them back."""
    rng = np.random.default_rng(0)
    keys = ["a", "k00001", "x" * 93, "x" * 94, "y" * 200, "dir/sub/ключ", "é", "a b+c=d@e", "z" * 505]
    samples = [
        (f"{key[: 505 - len(str(i))]}{i}", {"latent.npy": rng.bytes(n), "json": b"{}"})
        for i, (key, n) in enumerate((k, n) for k in keys for n in (0, 1, 511, 512, 513, 10_000))
    ]
    f = io.BytesIO(head)
    f.seek(len(head))
    with TarShardWriter(f) as w:
        for key, fields in samples:
            w.write(key, fields)
    assert f.getvalue() == _tarfile_shard(samples, head)
    assert len(f.getvalue()) % tarfile.RECORDSIZE == 0  # records count from the file's start, as in tarfile
    back = list(iter_samples(io.BytesIO(f.getvalue()[len(head) :])))
    assert [(s.key, s.fields, s.error) for s in back] == [(k, fl, None) for k, fl in samples]


def test_batch_stream_yields_full_batches_and_every_key_each_epoch(tmp_path):
    keys = [f"k{i:02d}" for i in range(10)]
    _write_shard(tmp_path / "a.tar", keys[:5])
    _write_shard(tmp_path / "b.tar", keys[5:])
    shards = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    stream = iter(BatchStream(shards, _collate, batch_size=3, shuffle_buffer=1, prefetch=2))
    batches = _take(stream, 7)  # 21 samples: two full epochs and a bit
    assert all(len(b["keys"]) == 3 and b["x"].shape == (3, 4, 2, 2) for b in batches)
    seen = [k for b in batches for k in b["keys"]]
    assert sorted(seen[:10]) == keys  # the first epoch holds every key exactly once
    assert sorted(seen[10:20]) == keys  # and so does the second


@pytest.mark.timeout(60)
def test_batch_stream_without_a_readable_sample_fails_instead_of_spinning(tmp_path):
    write_tar(str(tmp_path / "junk.tar"), [("../evil.txt", b"x"), ("a/../../b.npy", b"y")])  # unsafe keys only
    stream = iter(BatchStream([str(tmp_path / "junk.tar")], _collate, batch_size=2))
    with pytest.raises(ValueError, match="no readable sample in 1 shard"):
        _take(stream, 1)


def test_batch_stream_shuffles_with_a_larger_buffer(tmp_path):
    keys = [f"k{i:02d}" for i in range(12)]
    _write_shard(tmp_path / "a.tar", keys)
    stream = iter(BatchStream([str(tmp_path / "a.tar")], _collate, batch_size=4, shuffle_buffer=6, seed=3))
    seen = [k for b in _take(stream, 6) for k in b["keys"]]
    assert set(seen) == set(keys)
    assert seen[:12] != keys  # not in storage order


def test_batch_stream_skips_unsafe_duplicate_and_corrupt_samples(tmp_path):
    good = {f"g{i}": np.full((4, 2, 2), i, np.float16) for i in range(4)}
    members = []
    for key, z in good.items():
        members += [(f"{key}.latent.npy", _npy(z)), (f"{key}.id.txt", key.encode())]
    members[2:2] = [("../evil.latent.npy", _npy(good["g0"])), ("../evil.id.txt", b"../evil")]
    members += [("g1.latent.npy", _npy(good["g1"])), ("g1.id.txt", b"g1-duplicate")]
    members += [("/abs/x.latent.npy", _npy(good["g0"])), ("/abs/x.id.txt", b"/abs/x")]
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    # a second shard whose third sample has a garbage header: the samples before it still stream,
    # except the one being read when the tar broke (its end was never seen, so it may be partial)
    _write_shard(tmp_path / "cut.tar", ["c0", "c1", "c2"])
    data = bytearray((tmp_path / "cut.tar").read_bytes())
    header = {m.name: m.offset for m in tarfile.open(tmp_path / "cut.tar")}["c2.latent.npy"]
    data[header + 100 : header + 108] = b"garbage!"
    (tmp_path / "cut.tar").write_bytes(bytes(data))
    shards = [str(tmp_path / "bad.tar"), str(tmp_path / "cut.tar")]
    stream = iter(BatchStream(shards, _collate, batch_size=2, shuffle_buffer=1))
    seen = [k for b in _take(stream, 10) for k in b["keys"]]
    assert set(seen) == {"g0", "g1", "g2", "g3", "c0"}
    assert "g1-duplicate" not in seen and "../evil" not in seen and "/abs/x" not in seen


def test_batch_stream_needs_shards():
    with pytest.raises(ValueError, match="no shards to stream"):
        BatchStream([], _collate, batch_size=2)


def test_batch_stream_surfaces_collate_errors(tmp_path):
    _write_shard(tmp_path / "a.tar", ["k0", "k1"])

    def boom(items, rng):
        raise KeyError("missing field")

    stream = iter(BatchStream([str(tmp_path / "a.tar")], boom, batch_size=2))
    with pytest.raises(KeyError, match="missing field"):
        next(stream)
    stream.close()


def _latent_dataset(root, n: int = 6, stored_shape=(4, 2, 2), manifest_shape=(4, 2, 2), with_views: bool = False):
    root.mkdir()
    zs = []
    with open(root / "shard-000000.tar", "wb") as f, TarShardWriter(f) as w:
        for i in range(n):
            z = (np.arange(np.prod(stored_shape)).reshape(stored_shape) * 0.25 + i).astype(np.float16)
            zs.append(z)
            fields = {"latent.npy": _npy(z), "std.npy": _npy(np.full(stored_shape, 0.1, np.float16))}
            if with_views:
                fields["upscale2.npy"] = _npy((z * 2).astype(np.float16))
                fields["cls"] = str(i % 3).encode()
            w.write(f"{i:06d}", fields)
    records = [_record("shard-000000.tar", n, skipped={"too_small": 1})]
    man = _build(records, latent_shape=list(manifest_shape), tasks=["upscale2"] if with_views else [])
    manifest.write(str(root), man, records)
    return np.stack(zs).astype(np.float32)


def test_latent_stream_yields_scaled_latents(tmp_path):
    zs = _latent_dataset(tmp_path / "lat")
    stream = iter(latent_stream(str(tmp_path / "lat"), batch_size=2, shuffle_buffer=1))
    batches = _take(stream, 3)
    assert all(isinstance(b, Batch) and b.cond is None and b.y is None for b in batches)
    x0 = torch.cat([b.x0 for b in batches])
    assert x0.dtype == torch.float32 and x0.shape == (6, 4, 2, 2)
    # one shard, shuffle buffer of one: storage order; scale 0.5 and shift 1.0 from the manifest
    torch.testing.assert_close(x0, torch.from_numpy((zs - 1.0) * 0.5))


def test_latent_stream_task_views_and_classes(tmp_path):
    zs = _latent_dataset(tmp_path / "lat", with_views=True)
    stream = iter(
        latent_stream(str(tmp_path / "lat"), batch_size=3, shuffle_buffer=1, task="upscale2", use_classes=True)
    )
    b = _take(stream, 1)[0]
    torch.testing.assert_close(b.x0, torch.from_numpy((zs[:3] - 1.0) * 0.5))
    torch.testing.assert_close(b.cond, torch.from_numpy((zs[:3] * 2 - 1.0) * 0.5))
    assert b.y.tolist() == [0, 1, 2]
    with pytest.raises(ManifestError, match="latent dataset has no 'restore' view"):
        latent_stream(str(tmp_path / "lat"), batch_size=3, task="restore")


def test_latent_stream_refuses_a_latent_of_another_shape(tmp_path):
    _latent_dataset(tmp_path / "lat", stored_shape=(4, 3, 3), manifest_shape=(4, 2, 2))
    stream = iter(latent_stream(str(tmp_path / "lat"), batch_size=2, shuffle_buffer=1))
    try:
        with pytest.raises(ManifestError, match=r"has shape \[4, 3, 3\], the manifest says \[4, 2, 2\]") as err:
            next(stream)
        assert err.type is ManifestError
    finally:
        stream.close()


def test_latent_stream_refuses_a_dataset_without_manifest(tmp_path):
    with pytest.raises(ManifestError, match=r"no _manifest\.json"):
        latent_stream(str(tmp_path), batch_size=2)
