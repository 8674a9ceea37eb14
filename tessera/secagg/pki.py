"""Who signed what: the party keys SecAgg+ clients sign their round keys and survivor statements with.

Against a malicious coordinator (Bell et al. 2020) a client must know that the X25519 keys the coordinator forwards
really are its neighbours', and that its neighbours were told the same survivor story. Both are Ed25519
signatures checked against a verify key per party that the coordinator cannot choose:

- `SimulatedPKI`: one random trust root per job object; every party's key derived from it (simulation, Ray, tests:
  all parties share the plugin object, so they share the PKI).
- `PartyKeys(signing_key=..., verify_keys={party: key})`: a deployment hook. Each party holds its own signing key
  and everyone's verify keys from out of band (for example the public keys bound to the federation's party
  certificates); the coordinator never supplies a verify key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tessera.core.errors import ConfigError

SIG_BYTES = 64
_RAW = serialization.Encoding.Raw


class PKI(Protocol):
    def sign(self, party: str, data: bytes) -> bytes:
        """`data` signed as `party` (raises ConfigError if this process does not hold that party's key)."""
        ...

    def verify(self, party: str, data: bytes, signature: bytes) -> bool:
        """Whether `signature` over `data` is `party`'s; False for an unknown party or a malformed signature."""
        ...


def verify_ed25519(public: bytes, data: bytes, signature: bytes) -> bool:
    if not (isinstance(signature, bytes) and len(signature) == SIG_BYTES):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def public_of(signing_key: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(signing_key).public_key().public_bytes(
        _RAW, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class SimulatedPKI:
    """Every party's Ed25519 key derived from one random root (HKDF(root, party)); for in-process and Ray runs.

    The root stands in for the federation CA: the coordinator's code paths never read it."""

    root: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

    def _key(self, party: str) -> Ed25519PrivateKey:
        seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"tessera/secagg/simulated-party-key/" + party.encode()).derive(self.root)
        return Ed25519PrivateKey.from_private_bytes(seed)

    def verify_key(self, party: str) -> bytes:
        return self._key(party).public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)

    def sign(self, party: str, data: bytes) -> bytes:
        return self._key(party).sign(data)

    def verify(self, party: str, data: bytes, signature: bytes) -> bool:
        return verify_ed25519(self.verify_key(party), data, signature)


@dataclass(frozen=True)
class PartyKeys:
    """A deployed party's view: its own Ed25519 signing key (raw 32 bytes; empty on the coordinator, which signs
    nothing) and every party's verify key, from out of band (bind them to the party certificates)."""

    party: str
    signing_key: bytes
    verify_keys: Mapping[str, bytes]

    def __post_init__(self) -> None:
        if self.signing_key and self.verify_keys.get(self.party) != public_of(self.signing_key):
            raise ConfigError(f"secagg signing key of {self.party!r} does not match its verify key in verify_keys; "
                              "issue the keys again")

    def sign(self, party: str, data: bytes) -> bytes:
        if party != self.party or not self.signing_key:
            raise ConfigError(f"this process holds no secagg signing key for {party!r}")
        return Ed25519PrivateKey.from_private_bytes(self.signing_key).sign(data)

    def verify(self, party: str, data: bytes, signature: bytes) -> bool:
        key = self.verify_keys.get(party)
        return key is not None and verify_ed25519(key, data, signature)
