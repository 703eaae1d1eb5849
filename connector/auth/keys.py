"""Key material for SMART Backend Services: generate a signing key and its public JWK Set.

The private key stays on the connector host (file mode 0600); the JWK Set is what the clinic
registers with the EHR, ideally hosted at an HTTPS URL so keys can be rotated (see
docs/authentication.md).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from connector.errors import ConfigError

SigningAlg = Literal["RS384", "ES384"]
SUPPORTED_ALGS: tuple[str, ...] = ("RS384", "ES384")
RSA_KEY_BITS = 3072  # NIST: 2048 is the floor until 2030; 3072 avoids a forced rotation then.
MIN_RSA_KEY_BITS = 2048
_KID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Members that only private JWKs carry; a public JWK Set must never contain them.
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def _b64url_uint(value: int, length: int | None = None) -> str:
    """Base64url (no padding) of a big-endian unsigned integer, as JWK requires (RFC 7518 §2)."""
    if length is None:
        length = max(1, (value.bit_length() + 7) // 8)
    return base64.urlsafe_b64encode(value.to_bytes(length, "big")).rstrip(b"=").decode("ascii")


def check_kid(kid: str) -> str:
    """Validate a key id (it becomes part of file names and must be unique in the JWK Set).

    Raises:
        ConfigError: empty, too long, or characters outside ``A-Z a-z 0-9 . _ -``.
    """
    if not isinstance(kid, str) or not _KID_RE.match(kid):
        raise ConfigError(
            "key id (kid) must be 1-64 characters of letters, digits, '.', '_' or '-', starting "
            "with a letter or digit, e.g. 'peersync-2025-01'"
        )
    return kid


def check_key_matches_alg(key: PrivateKey | PublicKey, alg: str) -> None:
    """Require RS384 ↔ RSA ≥ 2048 bits and ES384 ↔ EC P-384 (JOSE binds ES384 to that curve).

    Raises:
        ConfigError: the key type, size or curve does not fit ``alg``.
    """
    if alg == "RS384":
        if not isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
            raise ConfigError(
                "alg RS384 needs an RSA key, but the configured key is not RSA; set alg = \"ES384\" "
                "or use an RSA key"
            )
        if key.key_size < MIN_RSA_KEY_BITS:
            raise ConfigError(f"RSA key has {key.key_size} bits; at least {MIN_RSA_KEY_BITS} are required")
    elif alg == "ES384":
        if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
            raise ConfigError(
                "alg ES384 needs an EC P-384 key, but the configured key is not EC; set alg = \"RS384\" "
                "or use an EC key"
            )
        if not isinstance(key.curve, ec.SECP384R1):
            raise ConfigError(f"alg ES384 needs curve P-384 (secp384r1), but the key uses {key.curve.name}")
    else:
        raise ConfigError(f"unsupported signing alg {alg!r}; use one of {', '.join(SUPPORTED_ALGS)}")


def alg_for_key(key: PrivateKey | PublicKey) -> SigningAlg:
    """The SMART signing algorithm implied by a key (RSA → RS384, EC P-384 → ES384).

    Raises:
        ConfigError: the key is neither RSA nor EC P-384.
    """
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        alg: SigningAlg = "RS384"
    elif isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        alg = "ES384"
    else:
        raise ConfigError("the private key must be RSA (RS384) or EC P-384 (ES384)")
    check_key_matches_alg(key, alg)
    return alg


def load_private_key(pem: bytes, *, source: str = "private key") -> PrivateKey:
    """Parse an unencrypted PEM private key (PKCS#8 or traditional).

    Raises:
        ConfigError: not a PEM key, encrypted, or not RSA/EC (message never includes key bytes).
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError(
            f"{source} is encrypted with a passphrase; store it unencrypted in a 0600 file or "
            "secret volume (peersync does not prompt for passphrases)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        # The library's message could quote parts of the input; keep ours generic.
        raise ConfigError(f"{source} is not a valid PEM private key") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ConfigError(f"{source} must be an RSA or EC P-384 key")
    return key


def public_jwk(key: PrivateKey | PublicKey, alg: SigningAlg, kid: str) -> dict[str, Any]:
    """Return the public JWK (never private members) for ``key``, labelled for signature checks."""
    check_kid(kid)
    check_key_matches_alg(key, alg)
    pub = key.public_key() if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)) else key
    if isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        material: dict[str, Any] = {"kty": "RSA", "n": _b64url_uint(nums.n), "e": _b64url_uint(nums.e)}
    else:
        nums_ec = pub.public_numbers()
        size = (pub.curve.key_size + 7) // 8  # fixed-length coordinates (RFC 7518 §6.2.1.2)
        material = {
            "kty": "EC",
            "crv": "P-384",
            "x": _b64url_uint(nums_ec.x, size),
            "y": _b64url_uint(nums_ec.y, size),
        }
    return {**material, "kid": kid, "alg": alg, "use": "sig", "key_ops": ["verify"]}


def merge_jwks(jwks_docs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine JWK Sets (e.g. current + next key during rotation) into one to host.

    Raises:
        ConfigError: duplicate ``kid``, a malformed set, or a private member in any key.
    """
    keys: list[dict[str, Any]] = []
    seen: set[str] = set()
    for doc in jwks_docs:
        doc_keys = doc.get("keys") if isinstance(doc, Mapping) else None
        if not isinstance(doc_keys, list):
            raise ConfigError("a JWK Set must be a JSON object with a \"keys\" list")
        for jwk in doc_keys:
            if not isinstance(jwk, Mapping) or "kid" not in jwk or "kty" not in jwk:
                raise ConfigError("every JWK needs \"kty\" and \"kid\"")
            if _PRIVATE_JWK_MEMBERS & set(jwk):
                raise ConfigError(f"JWK {jwk['kid']!r} contains private key material; never publish it")
            if jwk["kid"] in seen:
                raise ConfigError(f"duplicate kid {jwk['kid']!r}; every key in the set needs its own kid")
            seen.add(jwk["kid"])
            keys.append(dict(jwk))
    return {"keys": keys}


def _write_new_file(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write ``data`` to ``path`` created with ``mode`` from the start (never chmod afterwards).

    Without ``overwrite`` the file is opened with O_EXCL, which also refuses symlinks. With it,
    we write a fresh temp file and rename it over the old one: truncating in place would keep the
    old file's (possibly wider) permissions.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    if not overwrite:
        fd = os.open(path, flags, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return
    tmp_path = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp_path, flags, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def key_file_paths(kid: str, out_dir: Path) -> tuple[Path, Path]:
    """Where :func:`generate_keypair` writes: ``<kid>.private.pem`` and ``<kid>.jwks.json``."""
    check_kid(kid)
    return out_dir / f"{kid}.private.pem", out_dir / f"{kid}.jwks.json"


def generate_keypair(
    alg: SigningAlg, kid: str, out_dir: Path, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Generate a signing key and write ``<kid>.private.pem`` (0600) and ``<kid>.jwks.json``.

    RS384 → RSA 3072-bit; ES384 → EC P-384. The JWK Set holds only the public key, with ``kid``,
    ``alg``, ``use: sig`` and ``key_ops: [verify]``; register or host it with the EHR.

    Returns:
        (private_key_path, jwks_path)

    Raises:
        ConfigError: bad alg/kid, a target file exists and ``overwrite`` is false, or the
            directory cannot be written.
    """
    if alg not in SUPPORTED_ALGS:
        raise ConfigError(f"unsupported alg {alg!r}; use RS384 or ES384")
    out_dir = Path(out_dir)
    key_path, jwks_path = key_file_paths(kid, out_dir)
    if not overwrite:
        existing = [str(p) for p in (key_path, jwks_path) if p.exists() or p.is_symlink()]
        if existing:
            raise ConfigError(
                f"refusing to overwrite existing {', '.join(existing)}; choose a new kid (recommended "
                "for rotation) or pass overwrite"
            )

    private_key: PrivateKey
    if alg == "RS384":
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    else:
        private_key = ec.generate_private_key(ec.SECP384R1())
    pem = private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    jwks = {"keys": [public_jwk(private_key, alg, kid)]}

    try:
        # Owner-only directory when we create it; an existing directory is left as the admin set it.
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_new_file(key_path, pem, 0o600, overwrite)
        _write_new_file(jwks_path, (json.dumps(jwks, indent=2) + "\n").encode("utf-8"), 0o644, overwrite)
    except FileExistsError as exc:
        raise ConfigError(
            f"refusing to overwrite existing {exc.filename}; choose a new kid or pass overwrite"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot write key files in {out_dir}: {exc.strerror or exc}") from None
    return key_path, jwks_path
