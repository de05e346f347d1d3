"""A whole local "cluster" for end-to-end tests: the API emulator with the kinfluence and dask CRDs,
the real dask-kubernetes controller (a `kopf run` subprocess), the kinfluence operator (kopf,
in-process in a thread, restartable) and the kubelet stand-in running pods as local processes."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import requests
import yaml
from k8s_emulator import EmulatorThread
from kubelet import Kubelet, free_port

import dask_kubernetes

from kinfluence.job.crd import crd

NAMESPACE = "default"
DASK_CRDS = pathlib.Path(dask_kubernetes.__file__).parent / "operator/deployment/helm/dask-kubernetes-operator/crds"
IJ_PATH = f"/apis/kinfluence.dev/v1alpha1/namespaces/{NAMESPACE}/influencejobs"
DASKJOBS_PATH = f"/apis/kubernetes.dask.org/v1/namespaces/{NAMESPACE}/daskjobs"


class OperatorThread:
    """The kinfluence operator (kinfluence.operator.entry.serve) in a thread; stop() ends it cleanly."""

    def __init__(self, liveness_port: int) -> None:
        self.liveness = f"http://127.0.0.1:{liveness_port}/healthz"
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kinfluence-operator", daemon=True)

    def _run(self) -> None:
        from kinfluence.operator.entry import serve

        try:
            asyncio.run(serve([NAMESPACE], self.liveness, stop_flag=self._stop, ready_flag=self._ready))
        except BaseException as err:  # surfaced by the tests
            self.error = err

    def start(self) -> OperatorThread:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError(f"the kinfluence operator did not get ready: {self.error!r}")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


class LocalCluster:
    """Everything an InfluenceJob needs, on 127.0.0.1."""

    def __init__(self, workdir: pathlib.Path, extra_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.k8s = EmulatorThread().start()
        self.url = self.k8s.url
        self.kubeconfig = self.k8s.write_kubeconfig(workdir / "kubeconfig")
        for path in sorted(DASK_CRDS.glob("*.yaml")):
            self.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", yaml.safe_load(path.read_text()))
        self.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd())
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        self.controller_log = open(workdir / "dask-controller.log", "wb")
        self.controller = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "-m", "dask_kubernetes.operator.controller", "--standalone",
             "--namespace", NAMESPACE], env=env, stdout=self.controller_log, stderr=subprocess.STDOUT)
        self.kubelet = Kubelet(self.url, NAMESPACE, workdir, self.kubeconfig, extra_env=extra_env).start()
        self.operator: OperatorThread | None = None
        self.liveness_port = free_port()
        self._saved_kubeconfig = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(self.kubeconfig)  # the in-process operator reads it
        self.start_operator()

    # ---- lifecycle

    def start_operator(self) -> None:
        self.operator = OperatorThread(self.liveness_port).start()

    def stop_operator(self) -> None:
        if self.operator is not None:
            self.operator.stop()
            self.operator = None

    def close(self) -> None:
        self.stop_operator()
        self.kubelet.stop()
        self.controller.terminate()
        try:
            self.controller.wait(20)
        except subprocess.TimeoutExpired:
            self.controller.kill()
        self.controller_log.close()
        self.k8s.stop()
        if self._saved_kubeconfig is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = self._saved_kubeconfig

    # ---- API and kubectl

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = requests.post(self.url + path, json=body, timeout=10)
        assert resp.status_code == 201, resp.text
        return resp.json()

    def get(self, path: str) -> dict[str, Any] | None:
        resp = requests.get(self.url + path, timeout=10)
        return resp.json() if resp.status_code == 200 else None

    def items(self, path: str) -> list[dict[str, Any]]:
        return list(requests.get(self.url + path, timeout=10).json()["items"])

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        proc = subprocess.run(["kubectl", f"--kubeconfig={self.kubeconfig}", *args], input=stdin,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def job(self, name: str) -> dict[str, Any] | None:
        return self.get(f"{IJ_PATH}/{name}")

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 120) -> Any:
        """Poll `check` until it returns something truthy; fail with the job's state and logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = check()
            if result:
                return result
            if self.operator is not None and self.operator.error is not None:
                raise AssertionError(f"the operator died: {self.operator.error!r}")
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}\n{self.diagnostics()}")

    def wait_phase(self, name: str, phase: str, timeout: float = 120) -> dict[str, Any]:
        return self.wait_for(f"{name} phase {phase}", lambda: (
            (j := self.job(name)) is not None and (j.get("status") or {}).get("phase") == phase and j), timeout)

    def diagnostics(self) -> str:
        """What went on, for a failing test's message."""
        parts = []
        for path in (IJ_PATH, DASKJOBS_PATH):
            for obj in self.items(path):
                parts.append(f"{obj['kind']} {obj['metadata']['name']}: {json.dumps(obj.get('status'))[:1500]}")
        parts.append(f"kubelet errors: {self.kubelet.errors[-5:]}")
        for log in sorted(self.workdir.glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-2500:]}")
        return "\n".join(parts)
