"""Signed bundles: who exported this model, checked against a key or the federation CA.

`signature.json` sits beside the manifest, outside its hash, and signs the manifest's digest (which covers the
SHA-256 of every file), so changing any byte of any file breaks it. Two kinds of signer:

- an Ed25519 private key (`SigningKey.ed25519(key)`); verified against that key's public half;
- a party's certificate key from the federation CA (`SigningKey.from_files("alice.crt", "alice.key")`, the
  files `tessera certs issue` writes): the signature embeds the party certificate, and verification against
  `ca.crt` checks the certificate was issued by the CA (and is valid now, not a CA itself) and then the
  signature with the certificate's key. The signer is the certificate's common name.

>>> save_bundle(model, "b", example_inputs=x, sign_with=SigningKey.from_files("certs/alice.crt", "certs/alice.key"))
>>> verify_bundle("b", trust=Trust.from_ca("certs/ca.crt")).signer
'alice'
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from tessera.core.errors import ExportError
from tessera.export.manifest import MAX_SIGNATURE_BYTES, SIGNATURE

CONTEXT = b"tessera-bundle-signature-v1\n"  # domain separation: this key signs bundle digests, nothing else
ED25519 = "ed25519"
ECDSA = "ecdsa-sha256"


@dataclass(frozen=True)
class SigningKey:
    """A private key that signs bundles, with the party certificate (PEM) when it is a certificate key."""

    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    certificate: bytes | None = None

    @classmethod
    def ed25519(cls, key: ed25519.Ed25519PrivateKey | None = None) -> SigningKey:
        """An Ed25519 signer (a fresh key if none is given; keep `key.key` to sign again)."""
        return cls(key or ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path) -> SigningKey:
        """A party's certificate and key as written by `tessera certs issue` (PEM, unencrypted)."""
        for p in (cert, key):
            if not Path(p).is_file():
                raise ExportError(f"{p} does not exist; issue the party certificate with `tessera certs issue`")
        try:
            private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
            certificate = x509.load_pem_x509_certificate(Path(cert).read_bytes())
        except (ValueError, TypeError) as exc:
            raise ExportError(f"{key} / {cert} are not a PEM key and certificate ({exc})") from None
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise ExportError(f"{key} is not an EC key written by `tessera certs issue`")
        if certificate.public_key() != private.public_key():
            raise ExportError(f"{key} is not the key of {cert}; pass the certificate and key of the same party")
        return cls(private, certificate.public_bytes(serialization.Encoding.PEM))

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Trust:
    """Whom a verifier trusts: Ed25519 public keys and/or federation CA certificates."""

    keys: tuple[ed25519.Ed25519PublicKey, ...] = ()
    cas: tuple[x509.Certificate, ...] = ()
    signer: str | None = None  # if set, the certificate's common name must equal it

    @classmethod
    def from_ca(cls, ca_cert: str | Path, *, signer: str | None = None) -> Trust:
        p = Path(ca_cert)
        if not p.is_file():
            raise ExportError(f"CA certificate {p} does not exist; pass the federation's ca.crt")
        try:
            return cls(cas=(x509.load_pem_x509_certificate(p.read_bytes()),), signer=signer)
        except ValueError as exc:
            raise ExportError(f"{p} is not a PEM certificate ({exc})") from None

    @classmethod
    def of(cls, value: Trust | SigningKey | ed25519.Ed25519PublicKey | x509.Certificate | str | Path) -> Trust:
        """A Trust from a Trust, a public key, a CA certificate, a signer's own key, or a ca.crt path."""
        if isinstance(value, Trust):
            return value
        if isinstance(value, ed25519.Ed25519PublicKey):
            return cls(keys=(value,))
        if isinstance(value, x509.Certificate):
            return cls(cas=(value,))
        if isinstance(value, SigningKey) and isinstance(value.key, ed25519.Ed25519PrivateKey):
            return cls(keys=(value.key.public_key(),))
        if isinstance(value, str | Path):
            return cls.from_ca(value)
        raise ExportError(f"trust= takes an Ed25519 public key, a CA certificate (or its path) or a Trust, got "
                          f"{type(value).__name__}")


def _message(digest: str) -> bytes:
    return CONTEXT + digest.encode("ascii")


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def sign(root: Path, digest: str, key: SigningKey) -> dict[str, Any]:
    """Write signature.json for a bundle whose manifest digest is `digest`; returns what it wrote."""
    if isinstance(key.key, ed25519.Ed25519PrivateKey):
        body = {"algorithm": ED25519, "signature": key.key.sign(_message(digest)).hex(),
                "public_key": key.public_pem().decode("ascii"), "signer": None}
    elif isinstance(key.key, ec.EllipticCurvePrivateKey) and key.certificate is not None:
        cert = x509.load_pem_x509_certificate(key.certificate)
        body = {"algorithm": ECDSA, "signature": key.key.sign(_message(digest), ec.ECDSA(hashes.SHA256())).hex(),
                "certificate": key.certificate.decode("ascii"), "signer": _common_name(cert)}
    else:
        raise ExportError("sign_with= takes SigningKey.ed25519(...) or SigningKey.from_files(cert, key)")
    record = {"digest": digest, **body}
    (root / SIGNATURE).write_text(json.dumps(record, sort_keys=True, indent=1) + "\n", encoding="utf-8")
    return record


def read_signature(root: Path) -> dict[str, Any] | None:
    path = root / SIGNATURE
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise ExportError(f"{path} is larger than {MAX_SIGNATURE_BYTES} bytes; not a tessera signature")
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ExportError(f"{path} is not valid JSON; the signature is corrupt") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("digest", "algorithm",
                                                                                          "signature")):
        raise ExportError(f"{path} lacks digest, algorithm or signature; the signature is corrupt")
    return record


def verify_signature(root: Path, digest: str, trust: Trust) -> str:
    """Check signature.json against `trust`; returns the signer (certificate CN, or 'ed25519:<key prefix>')."""
    record = read_signature(root)
    if record is None:
        raise ExportError("this bundle is not signed, but trust= was given; ask the exporting party to sign it "
                          "(save_bundle(..., sign_with=...)) or verify without trust=")
    if record["digest"] != digest:
        raise ExportError("the signature is for another bundle (its digest differs from the manifest's); the "
                          "bundle was changed after signing: do not use it")
    try:
        sig = bytes.fromhex(record["signature"])
    except ValueError:
        raise ExportError("the signature is not hex; the signature is corrupt") from None
    if record["algorithm"] == ED25519:
        return _verify_ed25519(record, sig, digest, trust)
    if record["algorithm"] == ECDSA:
        return _verify_cert(record, sig, digest, trust)
    raise ExportError(f"signature algorithm {record['algorithm']!r} is not supported")


def _verify_ed25519(record: dict[str, Any], sig: bytes, digest: str, trust: Trust) -> str:
    for key in trust.keys:
        try:
            key.verify(sig, _message(digest))
        except InvalidSignature:
            continue
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"ed25519:{raw.hex()[:16]}"
    raise ExportError("the bundle's Ed25519 signature does not verify against any trusted key; it was altered or "
                      "signed by someone else: do not use it")


def _verify_cert(record: dict[str, Any], sig: bytes, digest: str, trust: Trust) -> str:
    try:
        cert = x509.load_pem_x509_certificate(str(record.get("certificate", "")).encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ExportError("the signature's certificate is not a PEM certificate; the signature is corrupt") from None
    if not _issued_by_any(cert, trust.cas):
        raise ExportError("the signing certificate was not issued by a trusted CA (or has expired, or is a CA "
                          "itself); the bundle was signed by someone outside the federation: do not use it")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ExportError("the signing certificate does not hold an EC key; the signature is corrupt")
    try:
        public.verify(sig, _message(digest), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ExportError("the bundle's signature does not verify with its certificate's key; it was altered: do "
                          "not use it") from None
    name = _common_name(cert)
    if trust.signer is not None and name != trust.signer:
        raise ExportError(f"the bundle is signed by {name!r}, not by {trust.signer!r} as required")
    return name


def _issued_by_any(cert: x509.Certificate, cas: Sequence[x509.Certificate]) -> bool:
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return False
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        pass
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False
