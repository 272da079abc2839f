"""A real S3-protocol server for tests: moto's standalone server (`moto[server]`) as a separate process on
127.0.0.1, on a free port, stopped by its pid.

It speaks the S3 REST protocol over HTTP, so pyarrow's S3 filesystem (the job's mirror, publication, readers) and
boto3 (the lease's conditional writes) talk to it exactly as they would to a bucket: nothing in the package is
patched. The clients find it through the standard AWS variables (`AWS_ENDPOINT_URL` and fake credentials), which
`environment()` returns and the fixture sets for the session (and Ray workers inherit).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from cluster import free_port


@dataclass
class S3Server:
    process: subprocess.Popen
    port: int
    log_path: str

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        """What an S3 client needs to reach this server (pyarrow >= 15 and botocore read AWS_ENDPOINT_URL)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **_credentials(self)).create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def _credentials(server: S3Server) -> dict:
    env = server.environment()
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


def start_s3_server(log_dir: str, timeout: float = 60.0) -> S3Server:
    port = free_port()
    log_path = os.path.join(log_dir, "moto-server.log")
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    server = S3Server(process, port, log_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the S3 server exited with {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=2):
                return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"the S3 server did not answer within {timeout} s; see {log_path}")
