"""Secrets and storage faults (issue 22, second hostile pass), one test or more per class:

1. stored values stay true (credentials are kept out of what is stored by construction;
   only printed text is redacted);
2. every log line and traceback, ``--verbose`` included, is redacted;
3. a malformed credential URL or wrong ``--storage-options`` is one line, exit 2;
4. a storage outage of a few seconds is ridden out;
5. a remote checkpoint replaced between two runs is downloaded again.

Real parts only: a real moto S3 server on 127.0.0.1 (stopped and restarted for the outage).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import threading
import time

import pytest

from pipeline import cli
from pipeline.config import from_dict, public_dict
from pipeline.errors import ConfigError
from pipeline.io import retries, storage
from pipeline.stages.restore import RestoreConfig
from pipeline.train.diffusion import TrainConfig


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("latent-pipeline ") and ": error: " in ln]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    return errors[0]


# --------------------------------------------------------------------------- 1. stored values stay true


def test_a_stored_config_stays_byte_true_when_paths_hold_a_short_secret(tmp_path):
    """moto's `testing`, MinIO's `minioadmin`: short credentials that ordinary paths contain."""
    so = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    values = {
        "latents": "s3://testing-bucket/latent-testing",
        "vae": "s3://testing-bucket/latent-testing/vae",
        "output": "s3://testing-bucket/runs/testing-minioadmin",
        "storage_options": so,
    }
    cfg = from_dict(TrainConfig, values)
    recorded = public_dict(cfg)
    for name in ("latents", "vae", "output"):
        assert recorded[name] == values[name]  # not `latent-***`, not `s3://***-bucket`
    text = json.dumps(recorded)
    assert "storage" not in text and "endpoint_url" not in text and "***" not in text
    # the credentials are in no stored value: the storage group is left out whole
    assert '"secret"' not in text and '"key": "testing"' not in text
    # what is printed is left as it is too: a short secret is not searched for in text
    assert storage.redact(f"reading {values['vae']}") == f"reading {values['vae']}"


def test_a_url_with_user_info_is_stored_without_it(tmp_path):
    cfg = from_dict(
        RestoreConfig,
        {
            "input": "https://me:hunter2@images.example.org/in",
            "output": str(tmp_path / "out"),
            "checkpoint": "ftp://u:p%40ss@models.example.org/ck",
        },
    )
    assert cfg.input == "https://me:hunter2@images.example.org/in"  # the run itself uses it
    recorded = public_dict(cfg)
    assert recorded["input"] == "https://images.example.org/in"
    assert recorded["checkpoint"] == "ftp://models.example.org/ck"
    assert "hunter2" not in json.dumps(recorded) and "p%40ss" not in json.dumps(recorded)
    # a path that merely holds '@' or ':' after the host is not user-info: left as it is
    for url in ("s3://bucket/photos/me@home:1.jpg", "https://host/a:b@c/d", "s3://b/x,s3://b/y@z"):
        assert storage.public_url(url) == url


def test_printed_text_loses_url_passwords_and_credential_fields_only():
    assert storage.redact("s3://AKIA:wJalr/XUtn@bucket/x") == "s3://***@bucket/x"
    line = storage.redact('client {"key": "AKIAEXAMPLE", "secret": "testing", "token": "abc"} failed')
    assert "testing" not in line and "abc" not in line and "AKIAEXAMPLE" in line  # a key id is an identifier
    line = storage.redact("env aws_secret_access_key=minioadmin AWS_SESSION_TOKEN=FQoG/x+y= region=us-east-1")
    assert "minioadmin" not in line and "FQoG" not in line and "region=us-east-1" in line
    line = storage.redact("Authorization: AWS4-HMAC-SHA256 Credential=AKIA/x, Signature=deadbeef")
    assert "deadbeef" not in line
    # words that merely contain the field names are left alone
    assert storage.redact("max_tokens=77 tokens: 12 keys=3") == "max_tokens=77 tokens: 12 keys=3"


# --------------------------------------------------------------------------- 2. --verbose is redacted too


def test_verbose_traceback_and_library_logs_never_show_a_url_password(capsys, caplog, s3_endpoint):
    """The password reaches an exception's text inside a library (fsspec's HTTP filesystem names
    the URL it could not read, and the config loader quotes it); the verbose traceback prints it."""
    password = 'pa ss"w@rd SECRET'
    host = s3_endpoint.split("://", 1)[1]
    url = f"http://u:{password}@{host}/no-such-bucket-q/c.yaml"
    rc, err = _cli(capsys, "inspect", "-v", "--config", url, "s3://b/x")
    assert rc == 2 and "Traceback" in err and "ConfigError: config file 'http://***@" in err, err  # the traceback ...
    assert "SECRET" not in err and "pa ss" not in err and "w@rd" not in err, err  # ... without the password
    # a library's log line goes through the same redaction, whichever handler prints it
    logging.getLogger("botocore.credentials").error("loaded aws_secret_access_key=minioadmin from env")
    logging.getLogger("pipeline.test").error("retry s3://u:%s@bucket/k", "top/secret")
    err = capsys.readouterr().err + caplog.text  # the pipeline's handler and whatever else handles records
    assert "minioadmin" not in err and "top/secret" not in err
    assert "aws_secret_access_key=***" in err and "s3://***@bucket/k" in err


# --------------------------------------------------------------------------- 3. one line, exit 2


@pytest.mark.parametrize(
    ("argv", "names", "hidden"),
    [
        (['s3://u:pa ss"w@rd SECRET@bucket/x.tar'], "URL s3://***@bucket/x.tar", "SECRET"),
        (["s3://AKIAX:Zz/9+abcdef@bucket/x.tar"], "URL s3://***@bucket/x.tar", "9+abcdef"),
        (["http://u:pw123@127.0.0.1:9x/x.tar"], "port is not a number", "pw123"),
        (["--storage-options", '{"client_kwargs": "notadict"}', "s3://b/x"], "option 'storage-options'", ""),
        (["--storage-options", '{"no_such_option": 1}', "s3://b/x"], "option 'storage-options'", ""),
        (
            ["--storage-options", '{"client_kwargs": {"endpoint_url": "http://u:pw123@h:51x"}}', "s3://b/x"],
            "option 'storage-options'",
            "pw123",
        ),
    ],
)
def test_a_malformed_credential_url_or_storage_option_is_one_line_and_exit_2(capsys, s3_endpoint, argv, names, hidden):
    rc, err = _cli(capsys, "inspect", *argv)
    line = _error_line(err)
    assert rc == 2 and names in line, line
    assert not hidden or hidden not in err
    assert "(run with --verbose" not in line  # a user's mistake, said in full


def test_storage_options_are_checked_when_the_filesystem_is_first_built(s3_endpoint):
    with pytest.raises(ConfigError, match=r"option 'storage-options' does not suit s3://b/x.*no_such_option"):
        storage.filesystem("s3://b/x", {"no_such_option": 1})
    with pytest.raises(ConfigError, match=r"URL s3://\*\*\*@b/x"):
        storage.filesystem("s3://k:s@b/x")


# --------------------------------------------------------------------------- 4. outages


def test_retry_is_bounded_in_time_with_full_jitter():
    calls: list[float] = []

    def down() -> None:
        calls.append(time.monotonic())
        raise ConnectionError("endpoint down")

    start = time.monotonic()
    with pytest.raises(ConnectionError):
        storage.retry(down, what="t", budget=1.5, base_delay=0.05, max_delay=0.4)
    took = time.monotonic() - start
    assert took <= 1.6 and len(calls) >= 5  # many tries, never past the budget
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert max(gaps) <= 0.45  # each sleep at most max_delay (plus the call)
    assert retries.retry_budget() == 60.0 or os.environ.get(retries.RETRY_SECONDS_ENV)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_endpoint_outage_of_seconds_is_ridden_out_mid_stream_and_between_calls():
    """A second moto server, stopped for 4 s and restarted on the same port while a streaming
    read and a write run. botocore's own retries are turned off, so the pipeline's do the work."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()
    so = {
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        "config_kwargs": {"retries": {"total_max_attempts": 1}},
        "default_block_size": 65536,  # so the stream fetches block by block, across the outage
    }
    fs, _ = storage.filesystem(f"s3://outage-{port}/x", so)
    fs.mkdir(f"outage-{port}")
    data = os.urandom(600_000)
    url = f"s3://outage-{port}/blob.bin"
    storage.write_bytes(url, data, so)

    def outage(seconds: float) -> None:
        servers[-1].stop()
        time.sleep(seconds)
        servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        servers[-1].start()

    try:
        start = time.monotonic()
        with storage.open_read(url, so) as f:
            head = f.read(65536)
            down = threading.Thread(target=outage, args=(4.0,))
            down.start()
            time.sleep(0.3)
            rest = f.read()
        down.join()
        assert head + rest == data  # nothing lost, nothing doubled
        assert time.monotonic() - start >= 4.0  # the read really waited out the outage

        down = threading.Thread(target=outage, args=(4.0,))
        down.start()
        time.sleep(0.3)
        storage.write_bytes(f"{url}.copy", data, so)  # starts while the endpoint is down
        down.join()
        assert storage.read_bytes(f"{url}.copy", so) == data
    finally:
        servers[-1].stop()


# --------------------------------------------------------------------------- 5. replaced checkpoints


def test_a_remote_checkpoint_replaced_between_runs_is_downloaded_again(bucket, tmp_path):
    ck = f"{bucket}/ckpt"
    storage.write_bytes(f"{ck}/weights.safetensors", b"A" * 1000)
    storage.write_bytes(f"{ck}/config.json", b'{"v": 1}')
    first = storage.download_dir(ck, cache_root=str(tmp_path))
    assert open(os.path.join(first, "weights.safetensors"), "rb").read() == b"A" * 1000
    # replaced in place: same names, same sizes, other bytes
    storage.write_bytes(f"{ck}/weights.safetensors", b"B" * 1000)
    storage.write_bytes(f"{ck}/config.json", b'{"v": 2}')
    second = storage.download_dir(ck, cache_root=str(tmp_path))
    assert second != first
    assert open(os.path.join(second, "weights.safetensors"), "rb").read() == b"B" * 1000
    assert open(os.path.join(second, "config.json"), "rb").read() == b'{"v": 2}'
    assert storage.download_dir(ck, cache_root=str(tmp_path)) == second  # unchanged: served from the cache


def test_ray_workers_redact_their_log_records_as_the_driver_does(ray_cluster):
    """A worker's own log lines (a library's warning naming a URL with its password) reach the
    console through Ray's log forwarding, not the driver's handlers: the worker redacts them."""
    import ray

    @ray.remote
    def log_line() -> str:
        import logging

        record = logging.getLogger("some.library").makeRecord(
            "some.library", logging.WARNING, __file__, 1, "cannot reach %s", ("https://user:hunter2-pw@host/x",), None
        )
        return record.getMessage()

    line = ray.get(log_line.remote())
    assert "hunter2-pw" not in line and "host/x" in line, line
