"""A test-side kubelet stand-in: runs the dask scheduler and worker Deployments and the DaskJob runner
Pods it finds on the API emulator as real local processes, and reports their status like a kubelet
(pod phase and container states, deployment readiness, service status).

It executes the containers' own command/args from the manifests, with what a cluster would provide
replaced by local equivalents: executables from this virtual environment instead of the image,
127.0.0.1 and free ports instead of pod IPs, the local scheduler address instead of the scheduler
Service's DNS name, and a kubeconfig for the emulator instead of the in-cluster service account.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

BIN = pathlib.Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Container:
    """One local process standing in for a pod's (single) container."""

    kind: str  # "deployments" or "pods"
    name: str
    component: str
    cluster: str
    process: subprocess.Popen[bytes]
    port: int | None = None
    reported: str = ""
    log: pathlib.Path | None = None
    started: float = field(default_factory=time.monotonic)


class Kubelet:
    """Polls the emulator for dask Deployments and runner Pods in one namespace and runs them."""

    def __init__(self, api_url: str, namespace: str, workdir: pathlib.Path, kubeconfig: pathlib.Path,
                 extra_env: dict[str, str] | None = None, poll: float = 0.25) -> None:
        self.api = api_url
        self.namespace = namespace
        self.workdir = workdir
        self.kubeconfig = kubeconfig
        self.extra_env = dict(extra_env or {})
        self.poll = poll
        self.containers: dict[tuple[str, str], Container] = {}
        self.schedulers: dict[str, str] = {}  # cluster name -> tcp://127.0.0.1:port
        self.started_runners: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)
        self._lock = threading.Lock()
        self.errors: list[str] = []

    # ---- API helpers

    def _list(self, path: str) -> list[dict[str, Any]]:
        resp = requests.get(f"{self.api}{path}", timeout=10)
        resp.raise_for_status()
        return list(resp.json()["items"])

    def _patch_status(self, path: str, status: dict[str, Any]) -> None:
        requests.patch(f"{self.api}{path}/status", json={"status": status},
                       headers={"Content-Type": "application/merge-patch+json"}, timeout=10)

    # ---- process management

    def _spawn(self, key: tuple[str, str], obj: dict[str, Any], pod_spec: dict[str, Any]) -> Container | None:
        labels = obj["metadata"].get("labels") or {}
        component = labels.get("dask.org/component", "")
        cluster = labels.get("dask.org/cluster-name", "")
        container = pod_spec["containers"][0]
        env = {e["name"]: str(e.get("value", "")) for e in container.get("env") or [] if "value" in e}
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        port: int | None = None
        if component == "scheduler":
            port = free_port()
            argv = [a for a in argv]
            if "--host" in argv:
                argv[argv.index("--host") + 1] = "127.0.0.1"
            argv += ["--port", str(port), "--dashboard-address", f"127.0.0.1:{free_port()}"]
        else:
            if cluster not in self.schedulers:
                return None  # like a pod waiting for its scheduler Service to get endpoints
            env["DASK_SCHEDULER_ADDRESS"] = self.schedulers[cluster]
        if component == "worker":
            if "--dashboard-address" in argv:
                argv[argv.index("--dashboard-address") + 1] = "127.0.0.1:0"
            argv += ["--host", "127.0.0.1"]
        env.setdefault("DASK_WORKER_NAME", obj["metadata"]["name"])
        argv = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), ""), a) for a in argv]
        if argv and (BIN / argv[0]).exists():
            argv[0] = str(BIN / argv[0])
        run_env = dict(os.environ, **self.extra_env, **env, KUBECONFIG=str(self.kubeconfig))
        run_env.pop("KUBERNETES_SERVICE_HOST", None)
        log = self.workdir / f"{key[0]}-{key[1]}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, env=run_env, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.workdir, start_new_session=True)
        return Container(key[0], key[1], component, cluster, proc, port, log=log)

    def _stop_container(self, c: Container, sig: int = signal.SIGTERM) -> None:
        if c.process.poll() is None:
            try:
                os.killpg(c.process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                c.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(c.process.pid, signal.SIGKILL)
                c.process.wait(10)

    def kill_runner(self) -> str:
        """SIGKILL the running runner process (as if its node died); returns the pod name."""
        with self._lock:
            for c in self.containers.values():
                if c.component == "job-runner" and c.process.poll() is None:
                    os.killpg(c.process.pid, signal.SIGKILL)
                    return c.name
        raise AssertionError("no runner process is running")

    # ---- the sync loop

    def _sync(self) -> None:
        ns = self.namespace
        seen: set[tuple[str, str]] = set()
        deployments = self._list(f"/apis/apps/v1/namespaces/{ns}/deployments")
        pods = [p for p in self._list(f"/api/v1/namespaces/{ns}/pods")
                if (p["metadata"].get("labels") or {}).get("dask.org/component") == "job-runner"]
        for svc in self._list(f"/api/v1/namespaces/{ns}/services"):
            if "status" not in svc:
                self._patch_status(f"/api/v1/namespaces/{ns}/services/{svc['metadata']['name']}", {"loadBalancer": {}})
        objects = [("deployments", d, d["spec"]["template"]["spec"]) for d in deployments] + \
                  [("pods", p, p["spec"]) for p in pods]
        # schedulers first, so workers and runners of the same cluster can start in this round
        objects.sort(key=lambda o: (o[1]["metadata"].get("labels") or {}).get("dask.org/component") != "scheduler")
        for kind, obj, pod_spec in objects:
            key = (kind, obj["metadata"]["name"])
            seen.add(key)
            if obj["metadata"].get("deletionTimestamp"):
                continue
            if key not in self.containers:
                if kind == "pods" and (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    continue  # finished before (e.g. a kubelet restart); never rerun
                c = self._spawn(key, obj, pod_spec)
                if c is None:
                    continue
                self.containers[key] = c
                if c.component == "job-runner":
                    self.started_runners.append(c.name)
            self._report(self.containers[key], obj)
        for key in [k for k in self.containers if k not in seen]:
            c = self.containers.pop(key)
            self._stop_container(c)
            if c.component == "scheduler":
                self.schedulers.pop(c.cluster, None)

    def _report(self, c: Container, obj: dict[str, Any]) -> None:
        path = (f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{c.name}" if c.kind == "deployments"
                else f"/api/v1/namespaces/{self.namespace}/pods/{c.name}")
        rc = c.process.poll()
        if c.kind == "deployments":
            ready = rc is None and (c.port is None or port_open(c.port))
            if ready and c.component == "scheduler":
                self.schedulers[c.cluster] = f"tcp://127.0.0.1:{c.port}"
            state = "ready" if ready else "starting"
            if state != c.reported:
                n = 1 if ready else 0
                self._patch_status(path, {"observedGeneration": obj["metadata"].get("generation", 1), "replicas": 1,
                                          "readyReplicas": n, "availableReplicas": n, "updatedReplicas": 1,
                                          "conditions": [{"type": "Available", "status": "True" if ready else "False"}]})
                c.reported = state
            return
        phase = "Running" if rc is None else ("Succeeded" if rc == 0 else "Failed")
        if phase != c.reported:
            if rc is None:
                cstate: dict[str, Any] = {"running": {"startedAt": _now()}}
            else:
                cstate = {"terminated": {"exitCode": rc, "reason": "Completed" if rc == 0 else "Error",
                                         "finishedAt": _now()}}
            self._patch_status(path, {"phase": phase, "containerStatuses": [
                {"name": "runner", "ready": rc is None, "restartCount": 0, "state": cstate}]})
            c.reported = phase

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self._sync()
            except Exception as err:  # keep going like a kubelet; tests look at .errors
                self.errors.append(repr(err))
            self._stop.wait(self.poll)

    def start(self) -> Kubelet:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        for c in list(self.containers.values()):
            self._stop_container(c)
        self.containers.clear()

    def __enter__(self) -> Kubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
