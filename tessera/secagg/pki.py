"""Who signed what: the party keys SecAgg+ clients sign their round keys and survivor statements with.

Against a malicious coordinator (Bell et al. 2020) a client must know that the X25519 keys the coordinator forwards
really are its neighbours', and that its neighbours were told the same survivor story. Both are Ed25519
signatures checked against a verify key per party that the coordinator cannot choose:

- `SimulatedPKI`: one random trust root per job object; every party's key derived from it (simulation, Ray, tests:
  all parties share the plugin object, so they share the PKI).
- `CertPKI`: a deployment (`tessera party`). Each party signs with its mTLS certificate key and attaches its
  certificate; a peer's signature counts only if that certificate chains to the federation CA and its CN is the
  party's name, so the coordinator can forward keys but not forge them.
- `PartyKeys(signing_key=..., verify_keys={party: key})`: a hook for deployments with Ed25519 keys distributed out
  of band; the coordinator never supplies a verify key.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from tessera.core.errors import ConfigError

SIG_BYTES = 64
_RAW = serialization.Encoding.Raw


class PKI(Protocol):
    def credential(self, party: str) -> bytes:
        """What `party` attaches to its signed keys so that others can check its signatures (its certificate;
        empty where verify keys are known in advance)."""
        ...

    def sign(self, party: str, data: bytes) -> bytes:
        """`data` signed as `party` (raises ConfigError if this process does not hold that party's key)."""
        ...

    def verify(self, party: str, data: bytes, signature: bytes, credential: bytes = b"") -> bool:
        """Whether `signature` over `data` is `party`'s (`credential`: what the party attached); False for an
        unknown party, a credential that does not prove the party's identity, or a malformed signature."""
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


@functools.lru_cache(maxsize=4096)
def _simulated_key(root: bytes, party: str) -> Ed25519PrivateKey:
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"tessera/secagg/simulated-party-key/" + party.encode()).derive(root)
    return Ed25519PrivateKey.from_private_bytes(seed)


@functools.lru_cache(maxsize=4096)
def _simulated_verify_key(root: bytes, party: str) -> bytes:
    return _simulated_key(root, party).public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class SimulatedPKI:
    """Every party's Ed25519 key derived from one random root (HKDF(root, party)); for in-process and Ray runs.

    The root stands in for the federation CA: the coordinator's code paths never read it."""

    root: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

    def _key(self, party: str) -> Ed25519PrivateKey:
        return _simulated_key(self.root, party)

    def verify_key(self, party: str) -> bytes:
        return _simulated_verify_key(self.root, party)

    def credential(self, party: str) -> bytes:
        return b""

    def sign(self, party: str, data: bytes) -> bytes:
        return self._key(party).sign(data)

    def verify(self, party: str, data: bytes, signature: bytes, credential: bytes = b"") -> bool:
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

    def credential(self, party: str) -> bytes:
        return b""

    def sign(self, party: str, data: bytes) -> bytes:
        if party != self.party or not self.signing_key:
            raise ConfigError(f"this process holds no secagg signing key for {party!r}")
        return Ed25519PrivateKey.from_private_bytes(self.signing_key).sign(data)

    def verify(self, party: str, data: bytes, signature: bytes, credential: bytes = b"") -> bool:
        key = self.verify_keys.get(party)
        return key is not None and verify_ed25519(key, data, signature)


@functools.lru_cache(maxsize=256)
def _certificate(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


@dataclass(frozen=True)
class CertPKI:
    """A deployed party's view: it signs with its certificate key (EC P-256, ECDSA-SHA256) and attaches its
    certificate; a peer's signature is checked against the certificate the peer attached, which must be issued by
    the federation CA, be valid now and carry the party's name as CN (the designated identity field).

    `names` maps the names the protocol uses (job client ids such as "client0") to party names (certificate CNs);
    every party derives it from its own federation and job files, never from the coordinator.

    >>> pki = CertPKI.from_files("alice", ca_cert=Path("certs/ca.crt"), cert=Path("certs/alice.crt"),
    ...                          key=Path("certs/alice.key"), names={"client0": "alice", "client1": "bob"})
    """

    party: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(default=b"", repr=False)
    names: Mapping[str, str] = field(default_factory=dict)

    def _party(self, name: str) -> str:
        return self.names.get(name, name)

    @classmethod
    def from_files(cls, party: str, *, ca_cert: Path, cert: Path, key: Path | None,
                   names: Mapping[str, str] | None = None) -> CertPKI:
        def read(path: Path, what: str) -> bytes:
            if not path.is_file():
                raise ConfigError(f"secagg: the {what} {path} does not exist; issue it with `tessera certs issue`")
            return path.read_bytes()

        return cls(party, read(ca_cert, "CA certificate"), read(cert, "party certificate"),
                   read(key, "party key") if key is not None else b"", dict(names or {}))

    def credential(self, party: str) -> bytes:
        if self._party(party) != self.party:
            raise ConfigError(f"this process holds the certificate of {self.party!r}, not of {party!r}")
        return self.cert_pem

    def sign(self, party: str, data: bytes) -> bytes:
        if self._party(party) != self.party or not self.key_pem:
            raise ConfigError(f"this process holds no certificate key for {party!r}")
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"the certificate key of {party!r} is not an EC key; issue it with `tessera certs`")
        return key.sign(data, ec.ECDSA(hashes.SHA256()))

    def verify(self, party: str, data: bytes, signature: bytes, credential: bytes = b"") -> bool:
        try:
            cert, ca = _certificate(credential), _certificate(self.ca_pem)
            cert.verify_directly_issued_by(ca)
            now = dt.datetime.now(dt.UTC)
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                return False
            names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
            public = cert.public_key()
            if names != [self._party(party)] or not isinstance(public, ec.EllipticCurvePublicKey):
                return False
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True
