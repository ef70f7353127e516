"""Shared test fixtures: one real local Ray and one real S3 endpoint (moto server) per session."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on 127.0.0.1, configured through the standard AWS environment variables.

    Set before Ray starts, so Ray workers inherit the same endpoint and credentials, exactly as
    production workers get theirs from their environment.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "testing-key-id",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    yield url
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray for the whole session."""
    import ray

    from pipeline.ray_setup import ensure_ray

    ensure_ray(num_cpus=4)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh, empty bucket; returns its s3:// URL."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def pytest_collection_modifyitems(config, items):
    """Tests that use the session's Ray (or start Ray nodes) are marked ``ray``: `make test-fast`
    runs the rest (options, storage, formats, models, hostile inputs refused on the driver)."""
    for item in items:
        if {"ray_cluster", "two_node_cluster"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _pipeline_logging_propagates():
    """`cli.main` sets up console logging (its own handler, no propagation); undo that after
    each test so that pytest's `caplog` sees the `pipeline` loggers in the tests that follow."""
    yield
    import logging

    root = logging.getLogger("pipeline")
    root.handlers = [h for h in root.handlers if not getattr(h, "_pipeline", False)]
    root.propagate = True
