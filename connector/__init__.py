"""peersync: carry diabetes peer-support records into a clinic EHR as FHIR R4 resources.

The package is a library first; :mod:`connector.cli` is a thin command-line layer over it.
Data flows one way: read (``connector.read``) -> map (``connector.map``) -> plan (``connector.plan``) ->
write (``connector.write``); ``connector.run`` is the sync run.

The names below are the public library surface (docs/library.md has an example of each). They are imported
on first use, so ``import connector`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Settings": "connector.ops.config",
    "load_settings": "connector.ops.config",
    "load_profile": "connector.read.profile",
    "Staging": "connector.read.staging",
    "read_program": "connector.read.program",
    "MappingContext": "connector.map",
    "iter_bundles": "connector.map.export",
    "Ledger": "connector.plan.ledger",
    "sync_options": "connector.wiring",
    "read_and_plan": "connector.run",
    "build_client": "connector.wiring",
    "Syncer": "connector.run",
    "validate_offline": "connector.ops.validate",
}

__all__ = [
    "Ledger",
    "MappingContext",
    "Settings",
    "Staging",
    "Syncer",
    "__version__",
    "build_client",
    "iter_bundles",
    "load_profile",
    "load_settings",
    "read_and_plan",
    "read_program",
    "sync_options",
    "validate_offline",
]

if TYPE_CHECKING:
    from connector.map import MappingContext
    from connector.map.export import iter_bundles
    from connector.ops.config import Settings, load_settings
    from connector.ops.validate import validate_offline
    from connector.plan.ledger import Ledger
    from connector.read.profile import load_profile
    from connector.read.program import read_program
    from connector.read.staging import Staging
    from connector.run import Syncer, read_and_plan
    from connector.wiring import build_client, sync_options


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'connector' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
