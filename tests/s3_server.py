"""A real S3-compatible server for tests and benchmarks: moto's standalone server on 127.0.0.1, on a free port.

Not a mocked client: s3fs talks HTTP to a separate process, as it would to a bucket. Used by tests/test_object_storage.py
and scripts/bench_remote.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

ACCESS_KEY = "AKIDDISTILLTEST0000"
# Found nowhere but in the environment: the tests grep datasets, run folders and outputs for it.
SECRET_KEY = "distill-test-secret-7f3a9c1e5b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(bucket: str = "teams"):
    """Start the server, create `bucket`, yield the environment a client needs (endpoint and credentials); stop it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}")
                time.sleep(0.2)
        env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ENDPOINT_URL": endpoint,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            import s3fs

            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
