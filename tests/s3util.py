"""A real S3-compatible server for tests and benchmarks, on 127.0.0.1, started and stopped by the caller.

:class:`S3Server` runs moto's standalone server (``moto[server]``, from PyPI) in a child process, which also
hosts :class:`LatencyProxy`: a TCP proxy in front of moto that holds each HTTP request for ``delay_ms``
before forwarding it (a stand-in for a network round trip) and counts requests by method. The child
process prints one JSON line when ready and exits by itself when its parent dies, when told to on stdin
(EOF), or after ``max_life_s``; so a killed test run never leaves a server behind.

Credentials are checked (unless ``auth=False``): the child creates an IAM user with an access key
(``key``/``secret``) while moto's authentication is still off, then switches it on, so wrong credentials are
refused as on AWS.

    with S3Server(delay_ms=20) as s3:
        s3.make_bucket("labels")
        fkdstore.open("s3://labels/x.fkd", storage_options=s3.storage_options(proxy=True))
        s3.proxy_stats()          # {"requests": 123, "by_method": {"GET": 120, ...}, ...}

Subprocesses (torchrun ranks, the CLI) reach the server through :meth:`S3Server.env`: botocore (so s3fs)
honours ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``; ``AWS_CONFIG_FILE`` and
``AWS_SHARED_CREDENTIALS_FILE`` point nowhere so a developer's own profile never leaks in.

Run as a script it is the child: ``python tests/s3util.py --delay-ms 20 --parent PID``. The pytest fixtures
``s3_server`` and ``s3`` built on it are in tests/conftest.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REGION = "us-east-1"
_METHOD = re.compile(rb"^(GET|PUT|HEAD|POST|DELETE) ")
_STATS_PATH = b"/__proxy_stats__"
_RESET_PATH = b"/__proxy_reset__"


# --------------------------------------------------------------------------------------------- proxy


class LatencyProxy:
    """Asyncio TCP proxy: every client->server turn (an HTTP request, as clients do not pipeline) waits
    ``delay_s`` before it is forwarded (connection set-up costs nothing: moto's server closes connections
    that a real endpoint would keep alive).
    ``GET /__proxy_stats__`` and ``POST /__proxy_reset__`` on a fresh connection are answered by the proxy
    itself (JSON counts), not forwarded."""

    def __init__(self, upstream: tuple[str, int], delay_s: float):
        self.upstream, self.delay_s = upstream, delay_s
        self.reset()

    def reset(self) -> None:
        self.requests, self.by_method, self.connections = 0, {}, 0
        self.bytes_up = self.bytes_down = 0

    def stats(self) -> dict:
        return {"requests": self.requests, "by_method": dict(self.by_method), "connections": self.connections,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "delay_ms": self.delay_s * 1000}

    async def _control(self, first: bytes, writer) -> bool:
        line = first.split(b"\r\n", 1)[0]
        parts = line.split(b" ")
        if len(parts) < 2 or parts[1] not in (_STATS_PATH, _RESET_PATH):
            return False
        body = json.dumps(self.stats()).encode()
        if parts[1] == _RESET_PATH:
            self.reset()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()
        return True

    async def handle(self, c_reader, c_writer) -> None:
        first = await c_reader.read(65536)
        if not first or await self._control(first, c_writer):
            return
        self.connections += 1
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.close()
            return
        turn = {"up": False}  # True while the client is in the middle of sending a request

        async def up(data: bytes):
            while data:
                if not turn["up"]:  # a new client->server turn: one request (or a 100-continue body)
                    turn["up"] = True
                    m = _METHOD.match(data)
                    if m:
                        self.requests += 1
                        k = m.group(1).decode()
                        self.by_method[k] = self.by_method.get(k, 0) + 1
                    await asyncio.sleep(self.delay_s)
                self.bytes_up += len(data)
                s_writer.write(data)
                await s_writer.drain()
                data = await c_reader.read(65536)
            s_writer.close()

        async def down():
            while data := await s_reader.read(65536):
                turn["up"] = False
                self.bytes_down += len(data)
                c_writer.write(data)
                await c_writer.drain()
            c_writer.close()

        try:
            await asyncio.gather(up(first), down())
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (s_writer, c_writer):
                w.close()


# --------------------------------------------------------------------------------------------- child


def _child(args) -> None:
    import logging

    import boto3
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Credentials: an IAM user allowed everything, created while moto's auth is still off.
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName="fkdstore")
    iam.put_user_policy(UserName="fkdstore", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="fkdstore")["AccessKey"]
    if args.auth:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on every request is authenticated
        ActionAuthenticatorMixin.request_count = 0

    loop = asyncio.new_event_loop()
    proxy = LatencyProxy((host, port), args.delay_ms / 1000)
    srv = loop.run_until_complete(asyncio.start_server(proxy.handle, "127.0.0.1", 0))
    pport = srv.sockets[0].getsockname()[1]
    threading.Thread(target=loop.run_forever, daemon=True).start()
    print(json.dumps({"endpoint": endpoint, "proxy": f"http://127.0.0.1:{pport}",
                      "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}), flush=True)

    def stdin_eof():
        sys.stdin.read()  # returns when the parent closes our stdin (or dies)
        os._exit(0)

    threading.Thread(target=stdin_eof, daemon=True).start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.max_life_s:
        if args.parent and os.getppid() != args.parent:
            break
        time.sleep(0.5)
    os._exit(0)


# --------------------------------------------------------------------------------------------- parent


class S3Server:
    """Start the child (moto + latency proxy); see the module docstring. Context manager."""

    def __init__(self, delay_ms: float = 0.0, *, auth: bool = True, max_life_s: float = 3600.0,
                 start_timeout_s: float = 120.0):
        self.delay_ms, self.auth, self.max_life_s, self.start_timeout_s = delay_ms, auth, max_life_s, start_timeout_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--delay-ms", str(self.delay_ms),
             "--parent", str(os.getpid()), "--max-life-s", str(self.max_life_s),
             "--auth" if self.auth else "--no-auth"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        box: dict = {}
        t = threading.Thread(target=lambda: box.setdefault("line", self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(self.start_timeout_s)
        line = box.get("line", "")
        if not line:
            if self.proc.poll() is None:
                self.proc.kill()
            err = self.proc.stderr.read()
            self.stop()
            raise RuntimeError(f"the moto S3 server did not start within {self.start_timeout_s:.0f} s: {err[-2000:]}")
        info = json.loads(line)
        self.endpoint, self.proxy = info["endpoint"], info["proxy"]
        self.key, self.secret = info["key"], info["secret"]
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the child exits on EOF
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc and self.proc.stdout, self.proc and self.proc.stderr):
            if f:
                f.close()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients
    def url(self, proxy: bool = False) -> str:
        return self.proxy if proxy else self.endpoint

    def storage_options(self, proxy: bool = False, **extra) -> dict:
        """fsspec/s3fs options reaching this server with valid credentials."""
        return {"endpoint_url": self.url(proxy), "key": self.key, "secret": self.secret, **extra}

    def env(self, proxy: bool = False) -> dict[str, str]:
        """Environment variables that make botocore/s3fs (in any process) use this server."""
        return {"AWS_ENDPOINT_URL": self.url(proxy), "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": REGION,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def filesystem(self, proxy: bool = False):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options(proxy), skip_instance_cache=True)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (if missing); returns ``"s3://name"``."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                              aws_access_key_id=self.key, aws_secret_access_key=self.secret)
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    def proxy_stats(self, reset: bool = False) -> dict:
        """The proxy's counts since the last reset (``reset=True`` zeroes them after reading)."""
        path = _RESET_PATH if reset else _STATS_PATH
        req = urllib.request.Request(self.proxy + path.decode(), method="POST" if reset else "GET")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="moto S3 server + latency proxy on 127.0.0.1 (test helper)")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--parent", type=int, default=0, help="exit when this process is no longer our parent")
    p.add_argument("--max-life-s", type=float, default=3600.0)
    p.add_argument("--auth", action=argparse.BooleanOptionalAction, default=True,
                   help="check credentials (costs server CPU per request; the benchmark turns it off)")
    _child(p.parse_args(argv))


if __name__ == "__main__":
    main()
