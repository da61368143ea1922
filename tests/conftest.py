"""Fixtures shared by several test modules: the moto S3 server of tests/s3util.py (test_s3, test_cache,
test_sources). Nothing here imports torch, moto or s3fs at import time (the torch-free lane loads this file too)."""

from __future__ import annotations

import os
import re
import time

import pytest
from s3util import S3Server


@pytest.fixture(scope="session")
def s3_server():
    """One moto server (no added latency) per test process; skips the test when moto is missing or the server
    cannot start."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as e:
        pytest.skip(f"S3 tests need moto[server] and s3fs (pip install -e '.[test]'): {e}")
    try:
        server = S3Server().start()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"the moto S3 server could not start on 127.0.0.1: {e}")
    server.make_bucket("fkd")
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """``(url_prefix, storage_options)`` for a fresh prefix in bucket ``fkd``; the environment points
    botocore at the server too (for subprocesses and env-only credentials)."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    return f"s3://fkd/{name}-{os.getpid()}-{time.monotonic_ns()}", s3_server.storage_options()
