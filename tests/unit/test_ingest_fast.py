"""The read stage's fast readers (RowConverter._fast_reader) against the general path (_field).

A fast reader may decline (answer _SLOW) but must never answer differently from the general path: every
field of every shipped profile is checked with cells built from its own code tables, formats and
near-misses, and with arbitrary text."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.read.convert import _SLOW, RowConverter
from connector.read.profile import Profile, load_profile

PROFILES = ["peersync-template", "redcap-example", "examples/sheets-es", "examples/app-json"]

# pieces of realistic and nearly-realistic cells: dates in and out of the profiles' formats and range,
# numbers, yes/no spellings, separators, whitespace, non-ASCII digits
_PIECES = [
    "2026-03-02", "2026-3-2", "2026-02-30", "2026-13-01", "1899-01-01", "2026-03-02 11:05", "2026-03-02 24:00",
    "2026-03-02T11:05", "2026-03-02T11:05:09", "2026-03-02 11:05:09", "2026-03-02T11:05:09-05:00",
    "03/02/2026", "03/02/2026 11:05", "02/03/2026", "45000", "45000.5", "12", "007", "0", "-3", "1e3", "٣",
    "²", "1.5", "yes", "No", "TRUE", "false", "1", "sí", "x", "", " ", ";", ",", "|", "  padded  ",
]


@cache
def _profile(name: str) -> Profile:
    return load_profile(name)


@cache
def _cell_texts(profile_name: str) -> list[str]:
    profile = _profile(profile_name)
    texts = list(_PIECES)
    for entries in profile.code_tables.values():
        for code, spellings in entries.items():
            texts += [str(code), *map(str, spellings), f" {str(code).upper()} "]
    return texts


@cache
def _cases() -> list[tuple[str, Any, str]]:
    cases = []
    for name in PROFILES:
        profile = _profile(name)
        for kind in profile.records:
            converter = RowConverter(profile, kind)
            for field, _spec, fast in converter._fields:
                if fast is not None:
                    cases.append((name, kind, field))
    return cases


def _agree(converter: RowConverter, field: str, cells: dict[str, Any]) -> bool:
    """True when the fast reader declines or gives exactly what _field gives; whether it answered."""
    spec = converter.spec.fields[field]
    fast = dict((n, f) for n, _s, f in converter._fields)[field]
    original: dict[str, str] = {}
    try:
        expected: Any = converter._field(field, spec, cells, original)
    except ValueError:
        expected = ValueError
    got = fast(cells)  # after _field: the code memo is filled, so code fields answer rather than decline
    if got is _SLOW:
        return False
    assert expected is not ValueError, f"{field}: fast reader accepted {cells!r}, the general path rejects it"
    assert not original, f"{field}: the general path kept original text for {cells!r}; the fast one drops it"
    assert got == expected and type(got) is type(expected), f"{field}: {cells!r}: fast {got!r}, general {expected!r}"
    if hasattr(got, "tzinfo"):
        assert got.tzinfo == expected.tzinfo
    return True


@pytest.mark.parametrize(("profile_name", "kind", "field"), _cases())
def test_fast_reader_agrees_with_the_general_path(profile_name: str, kind: Any, field: str) -> None:
    profile = _profile(profile_name)
    converter = RowConverter(profile, kind)
    column = converter.spec.fields[field].column
    texts = list(_cell_texts(profile_name))
    separator = converter.spec.fields[field].split or profile.options.list_separator
    texts += [f"{a}{separator}{b}" for a in texts[:60:7] for b in texts[::11]]
    answered = sum(_agree(converter, field, {column: text}) for text in texts)
    _agree(converter, field, {})  # column missing: declined or agreed
    assert answered, f"{field}: the fast reader declined every cell"


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fast_readers_agree_on_arbitrary_text(data: st.DataObject) -> None:
    profile_name, kind, field = data.draw(st.sampled_from(_cases()))
    converter = RowConverter(_profile(profile_name), kind)
    column = converter.spec.fields[field].column
    pieces = st.sampled_from(_cell_texts(profile_name)) | st.text(max_size=12)
    text = "".join(data.draw(st.lists(pieces, max_size=3)))
    _agree(converter, field, {column: text})


def test_the_contact_fields_of_the_template_all_have_fast_readers() -> None:
    profile = _profile("peersync-template")
    converter = RowConverter(profile, next(k for k in profile.records if k.value == "contact"))
    slow = [name for name, _spec, fast in converter._fields if fast is None]
    assert slow == []
