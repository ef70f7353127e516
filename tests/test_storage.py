import os

import pytest

from pipeline.io import storage


def test_brace_and_glob_expansion(tmp_path):
    for i in range(3):
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(b"x")
    (tmp_path / ".hidden.tar").write_bytes(b"x")
    braces = storage.expand(str(tmp_path / "shard-{000000..000002}.tar"))
    globbed = storage.expand(str(tmp_path / "*.tar"))
    assert [os.path.basename(u) for u in braces] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert globbed == braces  # hidden files never match
    with pytest.raises(FileNotFoundError, match="shard-000008"):
        storage.expand(str(tmp_path / "shard-{000008..000009}.tar"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        storage.expand(str(tmp_path / "nothing-*.tar"))


def test_expand_on_s3(bucket):
    for i in range(3):
        storage.write_bytes(f"{bucket}/in/s-{i}.tar", b"abc")
    assert storage.expand(f"{bucket}/in/s-*.tar") == [f"{bucket}/in/s-{i}.tar" for i in range(3)]
    assert storage.expand(f"{bucket}/in/s-{{0..1}}.tar") == [f"{bucket}/in/s-0.tar", f"{bucket}/in/s-1.tar"]
    assert storage.listdir(f"{bucket}/in") == ["s-0.tar", "s-1.tar", "s-2.tar"]


def test_local_write_is_atomic_and_leaves_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "out" / "file.bin"
    storage.write_bytes(str(target), b"first")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        storage.write_bytes(str(target), b"second")
    monkeypatch.undo()
    assert target.read_bytes() == b"first"  # the old content is intact
    assert os.listdir(tmp_path / "out") == ["file.bin"]  # no temp file left behind


def test_retry_retries_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return "ok"

    assert storage.retry(flaky, what="t", base_delay=0.001) == "ok"
    assert len(calls) == 3

    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        storage.retry(missing, what="t", base_delay=0.001)
    assert len(calls) == 1


def test_redact_hides_credentials():
    assert storage.redact("s3://AKIA:secret@bucket/x") == "s3://***@bucket/x"
    assert "secret" not in storage.redact("https://user:secret@host/path")


def test_checkpoint_dir_upload_commits_config_last(bucket, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"w")
    order = []
    real_put = storage.put_file

    def spy(local, url, so=None):
        order.append(os.path.basename(url))
        real_put(local, url, so)

    storage.put_file = spy
    try:
        storage.upload_dir(str(tmp_path), f"{bucket}/ckpt")
    finally:
        storage.put_file = real_put
    assert order == ["model.safetensors", "config.json"]
    local = storage.download_dir(f"{bucket}/ckpt")
    assert sorted(os.listdir(local)) == [".complete", "config.json", "model.safetensors"]
