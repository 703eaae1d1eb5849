"""peersync: carry diabetes peer-support records into a clinic EHR as FHIR R4 resources.

The package is a library first; :mod:`connector.cli` is a thin command-line layer over it.
Data flows one way: read (``connector.readers``) -> ingest (``connector.ingest``) ->
map (``connector.mappers``) -> plan (``connector.planner``) -> write (``connector.sync``).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
