"""The data peersync ships: mapping profiles, its terminology and the US Core 6.1.0 conformance resources.

The top-level ``mappings/`` folder of the repository is the source of truth. pyproject.toml installs it as the
package ``connector._assets``, so a wheel carries it and an editable install sees the folder itself; this module
is the one place that finds it (with :mod:`importlib.resources`). ``PEERSYNC_MAPPINGS_DIR`` points peersync at
another folder of the same layout (a clinic's own profiles and terminology).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from connector.errors import ConfigError

MAPPINGS_ENV = "PEERSYNC_MAPPINGS_DIR"
TERMINOLOGY = "terminology"
US_CORE = Path("fhir") / "us-core-6.1.0"
_PACKAGE = "connector._assets"


class AssetError(ConfigError):
    """A shipped data folder is missing: the installation is incomplete or PEERSYNC_MAPPINGS_DIR is wrong."""


def shipped_mappings_dir() -> Path:
    """The ``mappings/`` folder installed with peersync (ignores ``PEERSYNC_MAPPINGS_DIR``)."""
    try:
        root = resources.files(_PACKAGE)
    except ModuleNotFoundError:
        raise AssetError(
            "peersync's shipped mappings (package connector._assets) are not installed: reinstall peersync "
            "(pip install --force-reinstall peersync-*.whl, or pip install -e . in a source checkout)"
        ) from None
    if not isinstance(root, Path):  # a zip import: peersync reads its data as files, so it must be unpacked
        raise AssetError(f"peersync's shipped mappings are inside an archive ({root}): install peersync unpacked")
    return root


def mappings_dir() -> Path:
    """The mappings folder in use: ``PEERSYNC_MAPPINGS_DIR`` when set, else the shipped one."""
    override = os.environ.get(MAPPINGS_ENV)
    return Path(override) if override else shipped_mappings_dir()


def terminology_dir(mappings: Path | None = None) -> Path:
    """The folder of peersync's CodeSystems, ValueSets and extension definitions."""
    return (mappings or mappings_dir()) / TERMINOLOGY


def us_core_dir() -> Path:
    """The US Core 6.1.0 StructureDefinitions, ValueSets and CodeSystems (CC0; see the README.md beside them).

    Always the shipped copy: they are HL7's, not a program's, so ``PEERSYNC_MAPPINGS_DIR`` does not replace them.
    """
    return shipped_mappings_dir() / US_CORE


@dataclass(frozen=True)
class AssetProblem:
    """One runtime asset that a sync needs and cannot load."""

    what: str
    message: str
    fix: str


def check_runtime_assets() -> list[AssetProblem]:
    """Load every asset a sync reads besides its profile (the terminology and the codes the mappers use).

    ``config check`` and ``doctor`` call this so that they fail where a sync would.
    """
    from connector.map.codes import undefined_codes

    try:
        missing = undefined_codes()
    except ConfigError as exc:
        fix = (f"point {MAPPINGS_ENV} at a folder with a terminology/ subfolder, or unset it"
               if os.environ.get(MAPPINGS_ENV) else "reinstall peersync: its shipped terminology is missing")
        return [AssetProblem("terminology", str(exc), fix)]
    if missing:
        return [AssetProblem("terminology", f"codes the mappers write are not defined: {', '.join(missing)}",
                             f"restore the terminology files under {terminology_dir()}")]
    return []
