"""Secrets for the auth modes: read from files or settings, checked, and masked in server text."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from pydantic import SecretStr

from connector.errors import ConfigError

_MAX_SERVER_TEXT = 300


def read_secret_file(path: Path, what: str) -> str:
    """Read a secret file; trailing newlines (from ``echo`` or editors) are not part of the secret."""
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except FileNotFoundError:
        raise ConfigError(f"{what} file {str(path)!r} does not exist") from None
    except PermissionError:
        raise ConfigError(f"{what} file {str(path)!r} is not readable by this user") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} file {str(path)!r}: {type(exc).__name__}") from None


def resolve_secret(value: SecretStr | None, path: Path | None, what: str) -> SecretStr:
    if path is not None:
        text = read_secret_file(path, what)
    elif value is not None:
        text = value.get_secret_value()
    else:
        raise ConfigError(f"no {what} configured")
    if not text:
        raise ConfigError(f"the configured {what} is empty")
    return SecretStr(text)


def check_header_safe(secret: SecretStr, what: str) -> None:
    # requests would reject a CR/LF in a header with an error that quotes the header value.
    if any(ch in secret.get_secret_value() for ch in "\r\n\t "):
        raise ConfigError(f"the configured {what} contains whitespace or a line break; check the secret file")


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Shorten server-supplied text and mask any of our secrets a server might echo back."""
    for s in secrets:  # before truncating, or a cut-off secret would no longer match
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)[:_MAX_SERVER_TEXT]
