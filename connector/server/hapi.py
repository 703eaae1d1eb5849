"""HAPI FHIR's message ids that change what peersync does, named once.

HAPI prefixes every diagnostic with ``HAPI-NNNN``; these ids are stable across releases (unlike the text) and
carry no patient data, so they are safe to match on and to keep in the ledger.
"""

from __future__ import annotations

# A conditional reference (``Type?identifier=...``) in a transaction matched no resource.
CONDITIONAL_REFERENCE_UNRESOLVED = "HAPI-1091"
# A literal reference (``Type/id``) names a resource the server does not have.
LITERAL_REFERENCE_UNRESOLVED = "HAPI-1094"
UNRESOLVED_REFERENCE_CODES = (CONDITIONAL_REFERENCE_UNRESOLVED, LITERAL_REFERENCE_UNRESOLVED)

# A conditional update or create whose condition matched several resources (duplicates on the server).
CONDITIONAL_UPDATE_MATCHED_MULTIPLE = "HAPI-0958"
CONDITIONAL_MATCHED_MULTIPLE = "HAPI-0988"
CONDITIONAL_CREATE_MATCHED_MULTIPLE = "HAPI-2840"
MULTIPLE_MATCH_CODES = (CONDITIONAL_UPDATE_MATCHED_MULTIPLE, CONDITIONAL_MATCHED_MULTIPLE,
                        CONDITIONAL_CREATE_MATCHED_MULTIPLE)
