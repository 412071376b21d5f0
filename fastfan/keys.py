"""The keys tokens are signed with that need no network: an HS256 secret, a PEM public key.

Both fastfan.config (to check --jwt-public-key before forking) and fastfan.auth (to verify
tokens) use them; neither of those is imported here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

# The algorithms of the public keys we take, each fixed by its key's type.
PUBLIC_KEY_ALGORITHMS = ("RS256", "ES256", "EdDSA")
# RFC 7518 3.3: an RSA key for RS256 is 2048 bits or more; shorter ones can be factored.
MIN_RSA_BITS = 2048


class SigningKey(NamedTuple):
    """A key and the one algorithm a token signed with it must name."""

    key: Any
    algorithm: str


def public_key_algorithm(key: Any) -> str:
    """The algorithm a public key signs with: the key decides, never the token's header."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"the RSA key has {key.key_size} bits; RS256 needs at least "
                             f"{MIN_RSA_BITS} (RFC 7518 3.3)")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ValueError("the key is not an RSA, EC P-256 or Ed25519 public key "
                     "(RS256, ES256 or EdDSA)")


class SecretKey:
    """--jwt-secret: HS256."""

    def __init__(self, secret: str) -> None:
        self._key = SigningKey(secret, "HS256")

    def key_for(self, header: dict[str, Any]) -> SigningKey:
        return self._key


class PublicKey:
    """--jwt-public-key: one PEM public key; its type fixes the algorithm."""

    def __init__(self, pem: bytes) -> None:
        try:
            key = serialization.load_pem_public_key(pem)
        except ValueError:
            raise ValueError("not a PEM public key (-----BEGIN PUBLIC KEY-----): export one "
                             "with `openssl pkey -in private.pem -pubout`") from None
        except Exception as exc:  # cryptography's UnsupportedAlgorithm and kin
            raise ValueError(f"not a usable public key: {exc}") from None
        self._key = SigningKey(key, public_key_algorithm(key))

    @classmethod
    def from_file(cls, path: str) -> PublicKey:
        """The key in a PEM file; ValueError with a one-line reason when it cannot be used."""
        try:
            with open(path, "rb") as file:
                pem = file.read(1 << 20)
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        try:
            return cls(pem)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @property
    def algorithm(self) -> str:
        return self._key.algorithm

    def key_for(self, header: dict[str, Any]) -> SigningKey:
        return self._key
