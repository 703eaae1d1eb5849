"""peersync: carry diabetes peer-support records into a clinic EHR as FHIR R4 resources.

The package is a library first; :mod:`connector.cli` is a thin command-line layer over it.
Data flows one way: read (``connector.read.formats``) -> ingest (``connector.read.convert``) ->
map (``connector.map``) -> plan (``connector.plan``) -> write (``connector.write``); ``connector.run`` is the sync run.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
