"""Key generation: file modes, refusal to overwrite, and JWK Set round-trips through PyJWT."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from connector.auth import keys
from connector.errors import ConfigError, ExitCode

ALGS = ["RS384", "ES384"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    # RSA-3072 generation takes a moment; do each alg once per module.
    out = tmp_path_factory.mktemp("keys")
    return {alg: keys.generate_keypair(alg, f"test-{alg.lower()}", out) for alg in ALGS}


@pytest.mark.parametrize("alg", ALGS)
def test_private_key_file_is_owner_only(generated: dict[str, tuple[Path, Path]], alg: str) -> None:
    key_path, jwks_path = generated[alg]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.name == f"test-{alg.lower()}.private.pem"
    assert jwks_path.name == f"test-{alg.lower()}.jwks.json"


def test_private_key_created_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)  # the mode must come from os.open, not from the process umask
    try:
        key_path, jwks_path = keys.generate_keypair("ES384", "k1", tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(jwks_path.stat().st_mode) == 0o644


@pytest.mark.parametrize("alg", ALGS)
def test_key_type_and_size(generated: dict[str, tuple[Path, Path]], alg: str) -> None:
    key = keys.load_private_key(generated[alg][0].read_bytes())
    if alg == "RS384":
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == 3072
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP384R1)
    assert keys.alg_for_key(key) == alg


@pytest.mark.parametrize("alg", ALGS)
def test_jwks_is_public_only_and_labelled(generated: dict[str, tuple[Path, Path]], alg: str) -> None:
    jwks = json.loads(generated[alg][1].read_text())
    assert list(jwks) == ["keys"] and len(jwks["keys"]) == 1
    jwk = jwks["keys"][0]
    assert jwk["kid"] == f"test-{alg.lower()}"
    assert jwk["alg"] == alg
    assert jwk["use"] == "sig"
    assert jwk["key_ops"] == ["verify"]
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)
    if alg == "RS384":
        assert jwk["kty"] == "RSA" and set(jwk) >= {"n", "e"}
        assert jwk["e"] == "AQAB"
    else:
        assert jwk["kty"] == "EC" and jwk["crv"] == "P-384"
        # fixed-length 48-byte coordinates -> 64 base64url characters
        assert len(jwk["x"]) == 64 and len(jwk["y"]) == 64
    assert "=" not in json.dumps(jwk)  # base64url without padding


@pytest.mark.parametrize("alg", ALGS)
def test_jwks_round_trip_verifies_a_signature(generated: dict[str, tuple[Path, Path]], alg: str) -> None:
    key_path, jwks_path = generated[alg]
    private_key = keys.load_private_key(key_path.read_bytes())
    token = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, private_key, algorithm=alg,
                       headers={"kid": f"test-{alg.lower()}"})
    jwk_set = jwt.PyJWKSet.from_dict(json.loads(jwks_path.read_text()))
    public = jwk_set[jwt.get_unverified_header(token)["kid"]]
    assert jwt.decode(token, public.key, algorithms=[alg])["sub"] == "x"
    # and the public numbers equal the private key's
    pub_pem = public.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert pub_pem == private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    key_path, _jwks_path = keys.generate_keypair("ES384", "k1", tmp_path)
    before = key_path.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite") as exc_info:
        keys.generate_keypair("ES384", "k1", tmp_path)
    assert exc_info.value.exit_code == ExitCode.CONFIG_ERROR
    assert key_path.read_bytes() == before


def test_refuses_when_only_jwks_exists(tmp_path: Path) -> None:
    (tmp_path / "k1.jwks.json").write_text("{}")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        keys.generate_keypair("ES384", "k1", tmp_path)
    assert not (tmp_path / "k1.private.pem").exists()  # no half-written pair


def test_refuses_symlink_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "k1.private.pem").symlink_to(victim)
    with pytest.raises(ConfigError):
        keys.generate_keypair("ES384", "k1", tmp_path)
    assert victim.read_text() == "keep"


def test_overwrite_replaces_and_tightens_mode(tmp_path: Path) -> None:
    key_path, _ = keys.generate_keypair("ES384", "k1", tmp_path)
    os.chmod(key_path, 0o644)  # a previous, too-open file
    old = key_path.read_bytes()
    key_path2, jwks2 = keys.generate_keypair("ES384", "k1", tmp_path, overwrite=True)
    assert key_path2 == key_path
    assert key_path.read_bytes() != old
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert json.loads(jwks2.read_text())["keys"][0]["kid"] == "k1"


def test_creates_missing_directory_owner_only(tmp_path: Path) -> None:
    out = tmp_path / "new" / "keys"
    keys.generate_keypair("ES384", "k1", out)
    assert stat.S_IMODE(out.stat().st_mode) & 0o077 == 0


@pytest.mark.parametrize("kid", ["", "../evil", "a/b", ".hidden", "x" * 65, "white space"])
def test_bad_kid_rejected(tmp_path: Path, kid: str) -> None:
    with pytest.raises(ConfigError, match="kid"):
        keys.generate_keypair("ES384", kid, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_bad_alg_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="RS384 or ES384"):
        keys.generate_keypair("HS256", "k1", tmp_path)  # type: ignore[arg-type]


def test_key_alg_mismatch_detected() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ConfigError, match="P-384"):
        keys.check_key_matches_alg(p256, "ES384")
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ConfigError, match="RSA"):
        keys.check_key_matches_alg(p384, "RS384")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="2048"):
        keys.check_key_matches_alg(small, "RS384")


def test_load_private_key_errors_do_not_echo_input() -> None:
    junk = b"-----BEGIN PRIVATE KEY-----\nSECRETSECRET\n-----END PRIVATE KEY-----\n"
    with pytest.raises(ConfigError) as exc_info:
        keys.load_private_key(junk, source="test key")
    assert "SECRETSECRET" not in str(exc_info.value)
    assert exc_info.value.__cause__ is None and exc_info.value.__suppress_context__


def test_encrypted_key_rejected_with_hint() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(ConfigError, match="passphrase"):
        keys.load_private_key(pem)


def test_merge_jwks_for_rotation(generated: dict[str, tuple[Path, Path]]) -> None:
    docs = [json.loads(p.read_text()) for _, p in generated.values()]
    merged = keys.merge_jwks(docs)
    assert [k["kid"] for k in merged["keys"]] == ["test-rs384", "test-es384"]
    assert len(jwt.PyJWKSet.from_dict(merged).keys) == 2
    with pytest.raises(ConfigError, match="duplicate kid"):
        keys.merge_jwks(docs + docs[:1])
    leaked = {"keys": [{**docs[1]["keys"][0], "kid": "other", "d": "private"}]}
    with pytest.raises(ConfigError, match="private key material"):
        keys.merge_jwks([leaked])
