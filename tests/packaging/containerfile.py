"""The container recipe (docs/examples/Containerfile), read and exercised without a container builder.

No builder here can fetch the base image (no registry access), so the recipe is checked in two ways instead:
``tests/unit/test_container_recipe.py`` lints it (hadolint) and checks each rule of the operations guide, and
``python tests/packaging/containerfile.py`` (``make container-check``) runs its build and install steps on this
machine: the COPY sources into a fresh build context, the build stage's RUN, then the runtime stage's install
RUN into a clean virtualenv (image paths mapped into a temporary root), and the entrypoint on the demo.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "docs" / "examples" / "Containerfile"


@dataclass
class Instruction:
    keyword: str
    value: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """The values of every instruction with this keyword, in order."""
        return [i.value for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> list[Stage]:
    """The stages of a Containerfile: comments dropped, continuation lines joined, keywords upper-cased."""
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, value = line.strip().partition(" ")
        keyword, value = keyword.upper(), " ".join(value.split())
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?: AS (\S+))?", value, re.IGNORECASE)
            assert match, f"FROM {value}"
            stages.append(Stage(match.group(1), match.group(2)))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append(Instruction(keyword, value))
    return stages


def run_install_steps(work: Path) -> Path:
    """Run the recipe's build and install steps under ``work``; return the installed virtualenv's bin folder."""
    build, runtime = parse(CONTAINERFILE.read_text(encoding="utf-8"))
    root = work / "root"  # the image's file system: /src, /dist, /tmp/dist, /opt/peersync live under it
    python = work / "python"  # the base image's `python`: a clean virtualenv of this machine's interpreter
    subprocess.run([sys.executable, "-m", "venv", str(python)], check=True)
    path_env = {"PATH": f"{python / 'bin'}:/usr/bin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HOME": str(work)}

    def in_root(command: str) -> str:
        for image_path in ("/opt/peersync", "/tmp/dist", "/dist", "/src"):
            command = re.sub(rf"(?<![\w/]){re.escape(image_path)}(?=[/\s]|$)", str(root) + image_path, command)
        return command

    def copy(sources: list[str], destination: str, source_root: Path, workdir: Path) -> None:
        target = workdir / destination if not destination.startswith("/") else root / destination.lstrip("/")
        for source in sources:
            origin = source_root / source.lstrip("/")
            if origin.is_dir():
                into = target if destination.endswith("/") and len(sources) == 1 else target / origin.name
                shutil.copytree(origin, into, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)

    workdir = root
    for stage in (build, runtime):
        for instruction in stage.instructions:
            if instruction.keyword == "WORKDIR":
                workdir = root / instruction.value.lstrip("/")
                workdir.mkdir(parents=True, exist_ok=True)
            elif instruction.keyword == "COPY":
                args = shlex.split(instruction.value)
                from_stage = [a for a in args if a.startswith("--from=")]
                args = [a for a in args if not a.startswith("--")]
                copy(args[:-1], args[-1], root if from_stage else REPO, workdir)
            elif instruction.keyword == "RUN" and not re.match(r"(groupadd|useradd)\b", instruction.value):
                # Creating the system user needs root and changes this machine: that step is only linted.
                print(f"container-check: RUN {instruction.value}")
                subprocess.run(["sh", "-ec", in_root(instruction.value)], cwd=workdir, env=path_env, check=True)
    return root / "opt" / "peersync" / "bin"


def main() -> int:
    """Run the install steps, then the entrypoint on the demo, from a folder outside the repository."""
    with tempfile.TemporaryDirectory(prefix="peersync-container-check.") as tmp:
        work = Path(tmp)
        bin_dir = run_install_steps(work)
        (_, runtime) = parse(CONTAINERFILE.read_text(encoding="utf-8"))[-2:]
        entrypoint = json.loads(runtime.all("ENTRYPOINT")[-1])
        command = [str(bin_dir / entrypoint[0]), *entrypoint[1:]]
        run_dir = work / "run"
        shutil.copytree(REPO / "fixtures" / "demo" / "template", run_dir / "template")
        demo_check = ["check", "--profile", "peersync-template", "--rejects-dir", "rejects", "template"]
        for args, expected in ((["--version"], 0), (["profile", "check", "peersync-template"], 0), (demo_check, 65)):
            done = subprocess.run([*command, *args], cwd=run_dir, capture_output=True, text=True, check=False)
            if done.returncode != expected:
                print(done.stdout + done.stderr)
                print(f"container-check: peersync {' '.join(args)} exited {done.returncode}, expected {expected}")
                return 1
            print(f"container-check: ok ({done.returncode}): peersync {' '.join(args)}")
    print("container-check: the recipe's install steps work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
