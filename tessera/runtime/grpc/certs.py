"""A federation CA and party certificates (EC P-256), and the identity check the coordinator runs on each peer.

`init_ca` makes the CA that every party trusts; `issue` signs a party certificate whose CN is the party name and
whose SAN carries the party's designated name `<name>.party.tessera.invalid` (plus DNS=<name>, DNS=localhost and
IP=127.0.0.1 for other TLS tools and loopback). Identity is read only from those designated fields: the
coordinator checks a client's CN, a client checks the coordinator's designated SAN (gRPC verifies the server name
against the SAN). Extra `--host` names never make a party: `issue` refuses one in the designated namespace, so a
certificate for alice that also lists `bob` or `server` is still only alice's. Keys are written with mode 0600
and never overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tessera.core.errors import ConfigError

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
PARTY_DOMAIN = ".party.tessera.invalid"  # RFC 6761: .invalid never resolves, so no real host can hold these names


def designated_name(party: str) -> str:
    """The SAN DNS name that identifies `party` as a TLS server (clients verify the coordinator against it)."""
    return f"{party}{PARTY_DOMAIN}"


def _write(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; pass --force to replace it (parties holding the old one stop "
                          "working)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # the umask may have narrowed or (for 0644) left other bits; set exactly
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew between hosts


def init_ca(out_dir: str | Path, *, common_name: str = "tessera federation CA", days: int = 3650,
            force: bool = False) -> tuple[Path, Path]:
    """Create `ca.crt` and `ca.key` (0600) in `out_dir`. Keep ca.key offline; parties need only ca.crt."""
    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(_now())
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(out / "ca.key", _key_pem(key), mode=0o600, force=force)
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), mode=0o644, force=force)
    return out / "ca.crt", out / "ca.key"


def _load_ca(ca_cert: Path, ca_key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    for p in (ca_cert, ca_key):
        if not p.is_file():
            raise ConfigError(f"{p} does not exist; run `tessera certs init` first or pass --ca-dir")
    cert = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_key}: expected an EC private key written by `tessera certs init`")
    return cert, key


def issue(out_dir: str | Path, name: str, *, ca_dir: str | Path | None = None, days: int = 825,
          hosts: Sequence[str] = DEFAULT_HOSTS, force: bool = False) -> tuple[Path, Path]:
    """Sign `<name>.crt` and write `<name>.key` (0600). `hosts` are extra SAN entries (DNS names or IPs). Parties
    verify each other only by the designated fields (the CN, and the SAN `designated_name(name)`, checked against
    the coordinator's name in federation.toml whatever address they dial), so extra hosts only matter to other TLS
    tools and never let a certificate act as another party."""
    out = Path(out_dir)
    taken = [h for h in hosts if h.lower().rstrip(".").endswith(PARTY_DOMAIN)]
    if taken:
        raise ConfigError(f"--host {taken[0]}: names ending in {PARTY_DOMAIN} identify parties and are set only from "
                          "--name; pass ordinary host names or IPs")
    ca_cert, ca_key = _load_ca(Path(ca_dir or out) / "ca.crt", Path(ca_dir or out) / "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(designated_name(name)), x509.DNSName(name)]
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(_now()).not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / f"{name}.key", _key_pem(key), mode=0o600, force=force)
    _write(out / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), mode=0o644, force=force)
    return out / f"{name}.crt", out / f"{name}.key"


def _texts(values: Sequence[bytes | str]) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in values]


def identity_problem(auth: Mapping[str, Sequence[bytes | str]], claimed: str | None,
                     allowed: Sequence[str]) -> str | None:
    """Why a peer may not act as `claimed` (None if it may). `auth` is grpc's `context.auth_context()`: TLS has
    already checked the chain against the federation CA; here the certificate's CN, the one name `issue` designates
    as the party's, must equal the party name the peer claims, and that party must be one this coordinator expects.
    SAN entries never count: `issue --host` puts arbitrary extra names there (a certificate for alice may carry
    DNS=bob), so a SAN match would let one party act as another."""
    if not claimed:
        return "no party name was sent; use `tessera party --name NAME`"
    if claimed not in allowed:
        return f"{claimed!r} is not a client party of this federation"
    if _texts(auth.get("transport_security_type", [])) != ["ssl"]:
        return "the connection is not TLS"
    if _texts(auth.get("x509_common_name", [])) != [claimed]:
        return f"the certificate presented is not issued to {claimed!r}"
    return None
