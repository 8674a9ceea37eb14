"""federation.toml validation and certificate issuing: errors name the key; keys are 0600; identities checked."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tessera.core.errors import ConfigError
from tessera.runtime.federation import Role
from tessera.runtime.grpc.certs import identity_problem, init_ca, issue
from tessera.runtime.grpc.config import build, load_federation

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deployment" / "federation.toml"


def _parties(*clients: str) -> list[dict[str, Any]]:
    return [{"name": "server", "role": "coordinator", "address": "127.0.0.1:5000"},
            *({"name": c, "role": "client"} for c in clients)]


def test_the_shipped_example_loads_and_resolves_paths_next_to_the_file() -> None:
    fed = load_federation(EXAMPLE)
    assert fed.coordinator.name == "server" and fed.client_names == ["alice", "bob", "carol"]
    assert fed.party("alice").cert == EXAMPLE.parent / "certs" / "alice.crt"
    assert fed.ca_cert == EXAMPLE.parent / "certs" / "ca.crt"
    assert fed.federation().coordinator is not None and fed.federation().clients == ["alice", "bob", "carol"]
    assert fed.party("server").role is Role.COORDINATOR


@pytest.mark.parametrize(("data", "match"), [
    ({"parties": [{"name": "a"}, {"name": "b"}]}, "exactly one party needs role"),
    ({"parties": [_parties()[0], {**_parties()[0], "name": "s2"}]}, "exactly one party needs role"),
    ({"parties": [{**_parties()[0], "role": "coordinator"}, {"name": "s", "role": "coordinator"}]}, "exactly one"),
    ({"parties": [{"name": "server", "role": "coordinator"}, {"name": "a"}]}, r"parties\.0\.address"),
    ({"parties": [{**_parties()[0], "address": "nohostport"}, {"name": "a"}]}, r"parties\.0\.address.*host:port"),
    ({"parties": _parties("a", "a")}, "unique"),
    ({"parties": _parties("localhost")}, r"parties\.1\.name.*reserved"),
    ({"parties": _parties("a"), "federation": {"chunk_bytes": 4096, "max_message_bytes": 2048}}, "chunk_bytes"),
    ({"parties": _parties("a"), "federation": {"retry": {"max_attempts": 0}}}, r"federation\.retry\.max_attempts"),
    ({"parties": _parties("a"), "federation": {"chunk_size": 5}}, r"federation\.chunk_size: unknown key"),
    ({"parties": [{**_parties()[0], "rolle": "x"}, {"name": "a"}]}, r"parties\.0\.rolle: unknown key"),
])
def test_invalid_federation_names_the_key(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build(data, source="federation.toml", base=Path("/x"))


def test_missing_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_federation(tmp_path / "nope.toml")


def test_issued_certificates_carry_the_name_and_keys_are_private(tmp_path: Path) -> None:
    ca_crt, ca_key = init_ca(tmp_path)
    crt, key = issue(tmp_path, "alice")
    for k in (ca_key, key):
        assert stat.S_IMODE(k.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "alice"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["alice.party.tessera.invalid", "alice", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    with pytest.raises(ConfigError, match="already exists"):
        issue(tmp_path, "alice")


def test_issue_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tessera certs init"):
        issue(tmp_path, "alice")


def test_identity_check_accepts_only_the_certified_name() -> None:
    auth = {"transport_security_type": [b"ssl"], "x509_common_name": [b"bob"],
            "x509_subject_alternative_name": [b"bob", b"localhost", b"127.0.0.1"]}
    assert identity_problem(auth, "bob", ["alice", "bob"]) is None
    assert "not issued to 'alice'" in str(identity_problem(auth, "alice", ["alice", "bob"]))
    assert "not a client party" in str(identity_problem(auth, "mallory", ["alice", "bob"]))
    assert "no party name" in str(identity_problem(auth, "", ["alice", "bob"]))
    assert "not TLS" in str(identity_problem({**auth, "transport_security_type": [b"insecure"]}, "bob", ["bob"]))
