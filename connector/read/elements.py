"""Which of the six essential elements of self-management support a contact addressed (Brownson & Heisler 2009).

A contact row may record its elements directly (a column, a list or checkbox columns: the profile's
``essential_elements`` field); those are kept exactly. When it records none, they are derived here from what
the row says happened (mappings/README.md, "Essential elements", gives the reasoning):

- each support type delivered implies the elements the profile's ``element_rules`` list for it;
- a completed contact that discussed goals (``goal_ids``: goals set, reviewed or revised with the participant)
  is collaborative goal setting;
- a completed contact whose purpose is intake or assessment is individualized assessment, one whose purpose is
  goal setting is collaborative goal setting.

A contact that did not happen (not reached, cancelled) delivered nothing: only its support types count (an
outreach attempt is still follow-up), never its purpose or goals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from connector.model import ContactOutcome, ContactPurpose, EssentialElement, SupportType

# What a contact's stated purpose implies about the elements it addressed.
PURPOSE_ELEMENTS: dict[ContactPurpose, EssentialElement] = {
    ContactPurpose.INTAKE: EssentialElement.INDIVIDUALIZED_ASSESSMENT,
    ContactPurpose.ASSESSMENT: EssentialElement.INDIVIDUALIZED_ASSESSMENT,
    ContactPurpose.GOAL_SETTING: EssentialElement.COLLABORATIVE_GOAL_SETTING,
}


def derived_elements(*, support_types: Iterable[str], goal_ids: Iterable[str], purpose: str | None,
                     outcome: str | None, element_rules: Mapping[SupportType, Iterable[EssentialElement]]
                     ) -> tuple[str, ...]:
    """The essential-element codes a contact that records none addressed, no duplicates: those of its support
    types in their order, then its purpose's, then collaborative goal setting for goals discussed."""
    found: dict[str, None] = {}
    for support in support_types:
        for element in element_rules.get(SupportType(support), ()):
            found[element.value] = None
    happened = outcome in (None, ContactOutcome.COMPLETED.value)
    if happened and purpose is not None and ContactPurpose(purpose) in PURPOSE_ELEMENTS:
        found[PURPOSE_ELEMENTS[ContactPurpose(purpose)].value] = None
    if happened and any(True for _ in goal_ids):
        found[EssentialElement.COLLABORATIVE_GOAL_SETTING.value] = None
    return tuple(found)
