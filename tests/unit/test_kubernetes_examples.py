"""The Kubernetes examples work as written: both manifests pass the Kubernetes schemas (kubernetes-validate ships
them, so this runs offline), the CronJob and the doctor Job run the Containerfile's image as its non-root user
with the volumes production-smart.toml expects, data problems do not fail the Job, and the CronJob's wrapper
pushes the metrics file to a Pushgateway after every run while keeping peersync's exit code (run here with a
stand-in `peersync` and a stand-in Pushgateway on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from connector.ops.metrics import parse_samples, render
from tests.packaging.containerfile import CONTAINERFILE
from tests.unit.test_scheduling_examples import cron_field_ok, parse_peersync_args

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
CRONJOB = EXAMPLES / "kubernetes-cronjob.yaml"
DOCTOR_JOB = EXAMPLES / "kubernetes-doctor-job.yaml"
# The oldest release the CronJob's comments support (podFailurePolicy is stable from 1.31) and the newest known.
KUBERNETES_VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]

pytestmark = pytest.mark.usefixtures("peersync_env")


def documents(path: Path) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def cronjob_container() -> dict[str, Any]:
    pod = documents(CRONJOB)["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return dict(container)


def wrapper_script() -> str:
    container = cronjob_container()
    assert container["command"] == ["/bin/sh", "-c"]
    (script,) = container["args"]
    return str(script)


def containerfile_uid() -> int:
    (user,) = [line.split()[1] for line in CONTAINERFILE.read_text().splitlines() if line.startswith("USER ")]
    return int(user.split(":")[0])


# -- schemas -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", [CRONJOB, DOCTOR_JOB], ids=lambda p: p.name)
def test_manifests_pass_the_kubernetes_schemas(path: Path, version: str) -> None:
    docs = list(documents(path).values())
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on an unknown or mistyped field


# -- the CronJob -------------------------------------------------------------------------------------------


def test_kubernetes_cronjob() -> None:
    docs = documents(CRONJOB)
    assert set(docs) == {"PersistentVolumeClaim", "CronJob"}
    pvc, cronjob = docs["PersistentVolumeClaim"], docs["CronJob"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    fields = spec["schedule"].split()
    assert len(fields) == 5 and all(cron_field_ok(f, i) for i, f in enumerate(fields))
    job = spec["jobTemplate"]["spec"]
    assert isinstance(job["backoffLimit"], int) and 0 < job["backoffLimit"] <= 6
    assert job["activeDeadlineSeconds"] > 0
    (failing,) = job["podFailurePolicy"]["rules"]
    # Codes a retry cannot fix end the Job; 69 (server) and 75 (lock) are retried.
    assert failing["action"] == "FailJob" and {1, 65, 77, 78} <= set(failing["onExitCodes"]["values"])
    assert not {0, 69, 75} & set(failing["onExitCodes"]["values"])
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    container = cronjob_container()
    assert container["name"] == failing["onExitCodes"]["containerName"]
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert set(volumes) == set(mounts)
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert "kind: Secret" not in CRONJOB.read_text()  # no secret in the manifest


def test_both_manifests_run_the_containerfile_image_as_its_user_with_the_configured_paths() -> None:
    cron_pod = documents(CRONJOB)["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    doctor_pod = documents(DOCTOR_JOB)["Job"]["spec"]["template"]["spec"]
    settings = tomllib.loads((EXAMPLES / "production-smart.toml").read_text())
    uid = containerfile_uid()
    images = set()
    for pod in (cron_pod, doctor_pod):
        assert pod["automountServiceAccountToken"] is False
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == context["fsGroup"] == uid
        (container,) = pod["containers"]
        images.add(container["image"])
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        env = {e["name"]: e["value"] for e in container["env"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert set(volumes) == set(mounts)
        # The mounts are where production-smart.toml (the ConfigMap's content) expects its files.
        assert env["PEERSYNC_CONFIG"] == f"{mounts['config']['mountPath']}/peersync.toml"
        assert Path(settings["auth"]["private_key_file"]).parent == Path(mounts["signing-key"]["mountPath"])
        assert Path(settings["sync"]["ledger"]).parent == Path(mounts["state"]["mountPath"])
        assert settings["source"]["inputs"] == [mounts["exports"]["mountPath"]]
        assert volumes["signing-key"]["secret"]["defaultMode"] == 0o400 and mounts["signing-key"]["readOnly"]
        assert mounts["tmp"]["mountPath"] == "/tmp" and "emptyDir" in volumes["tmp"]  # staging, read-only root
        # The metrics file persists with the ledger: each run carries counters and the last success over.
        assert Path(env["PEERSYNC_OUTPUT__METRICS_FILE"]).parent == Path(mounts["state"]["mountPath"])
    assert len(images) == 1  # the same image (docs/examples/Containerfile) for the sync and its pre-flight
    assert "docs/examples/Containerfile" in CRONJOB.read_text()


def test_cronjob_data_problems_do_not_fail_the_job() -> None:
    first_line = wrapper_script().splitlines()[0]
    args = shlex.split(first_line)
    assert args[0] == "peersync"
    context = parse_peersync_args(args[1:])
    assert context.params["exit_zero_on_data_problems"] is True
    env = {e["name"]: e["value"] for e in cronjob_container()["env"]}
    assert env["PEERSYNC_LOG_FORMAT"] == "json"


def test_doctor_job() -> None:
    (job,) = documents(DOCTOR_JOB).values()
    assert job["kind"] == "Job" and job["metadata"]["name"] == "peersync-doctor"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["ttlSecondsAfterFinished"] > 0
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    parse_peersync_args(container["args"])
    assert container["args"][0] == "doctor" and "command" not in container  # the image's entrypoint
    cron_pod = documents(CRONJOB)["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    cron_volumes = {v["name"]: v for v in cron_pod["volumes"] if v["name"] != "tmp"}
    assert {v["name"]: v for v in pod["volumes"] if v["name"] != "tmp"} == cron_volumes
    assert container["volumeMounts"] == cronjob_container()["volumeMounts"]


# -- the metrics push wrapper, run -------------------------------------------------------------------------


class StubPushgateway(ThreadingHTTPServer):
    """Records each request; answers 200, or ``status`` when set."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        self.status = 200
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: StubPushgateway

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append(("PUT", self.path, body))
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no request lines in the test output
        pass


@pytest.fixture
def pushgateway() -> Iterator[StubPushgateway]:
    server = StubPushgateway()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


STUB_PEERSYNC = """#!/bin/sh
printf '%s\\n' "$@" > "$STUB_DIR/args"
if [ -n "$STUB_METRICS" ]; then cp "$STUB_METRICS" "$PEERSYNC_OUTPUT__METRICS_FILE"; fi
exit "$STUB_EXIT"
"""


def run_wrapper(tmp_path: Path, url: str, exit_code: int, *, writes_metrics: bool = True
                ) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run the CronJob's wrapper with a stand-in `peersync` that writes a real metrics file (as `sync` does after
    every run) and exits ``exit_code``; ``python`` is this interpreter, as the image's is on its PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "peersync"
    stub.write_text(STUB_PEERSYNC)
    stub.chmod(0o755)
    if not (bin_dir / "python").exists():
        (bin_dir / "python").symlink_to(sys.executable)
    metrics = render({"exit_code": exit_code, "counts": {"created": 3, "rejected": 1}}, now=1_800_000_000)
    (tmp_path / "fresh.prom").write_text(metrics)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "STUB_DIR": str(tmp_path),
           "STUB_EXIT": str(exit_code), "STUB_METRICS": str(tmp_path / "fresh.prom") if writes_metrics else "",
           "PEERSYNC_OUTPUT__METRICS_FILE": str(tmp_path / "state" / "peersync.prom"), "PUSHGATEWAY_URL": url}
    (tmp_path / "state").mkdir(exist_ok=True)
    container_env = {e["name"] for e in cronjob_container()["env"]}
    assert {"PEERSYNC_OUTPUT__METRICS_FILE", "PUSHGATEWAY_URL"} <= container_env
    result = subprocess.run(["/bin/sh", "-c", wrapper_script()], env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    return result, metrics


@pytest.mark.parametrize("exit_code", [0, 65, 69, 77, 78, 1])
def test_wrapper_pushes_the_metrics_after_every_run_and_keeps_the_exit_code(
        tmp_path: Path, pushgateway: StubPushgateway, exit_code: int) -> None:
    result, metrics = run_wrapper(tmp_path, pushgateway.url, exit_code)
    assert result.returncode == exit_code, result.stderr
    assert (tmp_path / "args").read_text().split() == ["sync", "--quiet", "--exit-zero-on-data-problems"]
    ((method, path, body),) = pushgateway.requests
    # PUT replaces the whole group, so a metric the last run did not write (rows of a run stopped early) goes.
    assert method == "PUT" and path == "/metrics/job/peersync"
    assert body.decode() == metrics
    families = {f.name for f in text_string_to_metric_families(body.decode())}  # the Pushgateway's format
    assert {"peersync_last_run_exit_code", "peersync_last_success_timestamp_seconds"} <= families
    assert parse_samples(body.decode())["peersync_last_run_exit_code"] == exit_code
    assert result.stderr == ""


def test_wrapper_keeps_the_exit_code_when_the_push_fails(tmp_path: Path, pushgateway: StubPushgateway) -> None:
    pushgateway.status = 503
    result, _metrics = run_wrapper(tmp_path, pushgateway.url, 77)
    assert result.returncode == 77
    (line,) = result.stderr.splitlines()  # one JSON line, like peersync's own logs
    event = json.loads(line)
    assert event["event"] == "metrics-push-failed" and event["exit_code"] == 77
    assert "PUSHGATEWAY_URL" in event["message"] and "503" in event["message"]


def test_wrapper_pushes_nothing_without_a_metrics_file(tmp_path: Path, pushgateway: StubPushgateway) -> None:
    # A run killed before it wrote the file (first run ever): nothing to push, the exit code is kept.
    result, _metrics = run_wrapper(tmp_path, pushgateway.url, 137, writes_metrics=False)
    assert result.returncode == 137 and pushgateway.requests == [] and result.stderr == ""
