"""SMART scope grammar: parse scopes, and decide whether a granted set covers what peersync needs.

v1 (``system/Goal.write``) and v2 (``system/Goal.cu``) syntax are both understood; a v1 ``write`` covers
v2 ``cud``. See docs/authentication.md for the scope tables.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_settings import NoDecode


@dataclass(frozen=True)
class ResourceScope:
    """A parsed SMART resource scope, v1 (``system/Goal.write``) or v2 (``system/Goal.cu``)."""

    context: str  # patient | user | system
    resource: str  # a FHIR type or "*"
    permissions: frozenset[str]  # subset of c r u d s
    query: str = ""  # v2 granular restriction ("?category=..."), "" when none


_SCOPE_RE = re.compile(r"^(patient|user|system)/([A-Za-z]+|\*)\.([A-Za-z*]+)(\?.*)?$")
# SMART v2 (scopes-and-launch-context): v1 read = .rs, v1 write = .cud, v1 * = .cruds.
_V1_PERMISSIONS = {"read": frozenset("rs"), "write": frozenset("cud"), "*": frozenset("cruds")}


def parse_scope(scope: str) -> ResourceScope | None:
    """Parse one SMART resource scope; return ``None`` for other scopes (``openid``, ``launch``...).

    Raises:
        ValueError: it looks like a resource scope but the permission part is invalid
            (e.g. ``system/Goal.writ``).
    """
    m = _SCOPE_RE.match(scope)
    if m is None:
        if scope.startswith(("patient/", "user/", "system/")):
            raise ValueError(
                f"scope {scope!r} is not a valid SMART resource scope; expected e.g. system/Goal.cu "
                "(scopes are separated by spaces, not commas)"
            )
        return None
    context, resource, perm, query = m.groups()
    if perm in _V1_PERMISSIONS:
        perms = _V1_PERMISSIONS[perm]
    elif perm.islower() and set(perm) <= set("cruds") and len(set(perm)) == len(perm):
        perms = frozenset(perm)
    else:
        raise ValueError(
            f"scope {scope!r} has invalid permissions {perm!r}: use SMART v2 letters from 'cruds' "
            "in that order (e.g. .cu, .rs) or SMART v1 .read / .write / .*"
        )
    return ResourceScope(context, resource, perms, query or "")


def split_scopes(scopes: str | Iterable[str] | None) -> list[str]:
    """Split a space-separated scope string (or pass a list through), dropping empties/duplicates."""
    if scopes is None:
        return []
    items = scopes.split() if isinstance(scopes, str) else [s for item in scopes for s in str(item).split()]
    return list(dict.fromkeys(items))


def missing_scopes(granted: str | Iterable[str], required: str | Iterable[str]) -> list[str]:
    """Return the required scopes that ``granted`` does not cover (empty list = all covered).

    Coverage rules: same context (``system/`` only covers ``system/``); the granted resource is
    the same type or ``*``; the required permissions are a subset of the union of permissions
    granted for that type (``system/Goal.c system/Goal.u`` covers ``system/Goal.cu``); v1
    ``write`` = v2 ``cud`` and ``read`` = ``rs``; a granular grant (``?category=...``) covers only
    the identical restriction. Non-resource scopes must be granted verbatim.
    """
    granted_list = split_scopes(granted)
    granted_set = set(granted_list)
    parsed: list[ResourceScope] = []
    for scope in granted_list:
        try:
            p = parse_scope(scope)
        except ValueError:  # a server-side oddity we cannot interpret grants nothing
            p = None
        if p is not None:
            parsed.append(p)

    missing: list[str] = []
    for r in split_scopes(required):
        if r in granted_set:
            continue
        try:
            need = parse_scope(r)
        except ValueError:
            need = None
        if need is None:
            missing.append(r)
            continue
        have: set[str] = set()
        for g in parsed:
            if g.context != need.context or g.resource not in ("*", need.resource):
                continue
            if g.query and g.query != need.query:
                continue
            have |= g.permissions
        if not need.permissions <= have:
            missing.append(r)
    return missing


def scope_covers(granted: str | Iterable[str], required: str | Iterable[str]) -> bool:
    """True when ``granted`` covers every scope in ``required`` (see :func:`missing_scopes`)."""
    return not missing_scopes(granted, required)


def _scope_list(value: Any) -> Any:
    """Accept a space-separated string, a JSON list string, or a list (TOML, env, code)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)  # a ValueError becomes a normal validation error
        else:
            return split_scopes(text)
    return value


# NoDecode: pydantic-settings would otherwise insist that PEERSYNC_AUTH__REQUIRED_SCOPES is JSON.
ScopeList = Annotated[list[str], NoDecode, BeforeValidator(_scope_list)]


def uses_v2_syntax(scopes: Iterable[str]) -> bool:
    """True if any resource scope uses SMART v2 letters (``.cu``) rather than v1 read/write."""
    for s in scopes:
        m = _SCOPE_RE.match(s)
        if m is not None and m.group(3) not in _V1_PERMISSIONS:
            return True
    return False
