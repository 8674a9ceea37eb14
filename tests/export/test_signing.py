"""Signed bundles (Ed25519, and a party's certificate key checked against the federation CA) and the audit log."""

import json
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

from tessera.core.errors import ExportError
from tessera.core.models import MLP
from tessera.export import (
    BundleReceiver,
    SigningKey,
    Trust,
    load_bundle,
    read_audit_log,
    save_bundle,
    send_bundle,
    verify_bundle,
)
from tessera.export.manifest import SIGNATURE
from tessera.export.sign import sign
from tessera.runtime.backend import InProcessBackend
from tessera.runtime.grpc.certs import init_ca, issue
from tests.export.test_bundle import reseal

X = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "fed")
    init_ca(root / "evil")
    for name in ("alice", "bob"):
        issue(root / "fed", name, ca_dir=root / "fed")
    issue(root / "evil", "alice", ca_dir=root / "evil")  # an impostor with the right name and the wrong CA
    return root


def party(pki: Path, ca: str, name: str) -> SigningKey:
    return SigningKey.from_files(pki / ca / f"{name}.crt", pki / ca / f"{name}.key")


def test_ed25519_signature_verifies_only_against_its_key(tmp_path: Path) -> None:
    key = SigningKey.ed25519()
    b = save_bundle(MLP(6, 3, [8]), tmp_path / "b", example_inputs=X[:2], sign_with=key)
    report = verify_bundle(b, trust=key.key.public_key())
    assert report.ok and report.signer is not None and report.signer.startswith("ed25519:")
    with pytest.raises(ExportError, match="any trusted key"):
        verify_bundle(b, trust=ed25519.Ed25519PrivateKey.generate().public_key())
    unsigned = save_bundle(MLP(6, 3, [8]), tmp_path / "u", example_inputs=X[:2])
    with pytest.raises(ExportError, match="not signed"):
        load_bundle(unsigned, trust=key.key.public_key())


def test_party_signed_bundle_verifies_against_the_federation_ca(pki: Path, tmp_path: Path) -> None:
    ca = pki / "fed" / "ca.crt"
    model = MLP(6, 3, [8])
    b = save_bundle(model, tmp_path / "b.tar", example_inputs=X[:2], sign_with=party(pki, "fed", "alice"))
    assert verify_bundle(b, trust=ca).signer == "alice"
    assert torch.equal(load_bundle(b, trust=Trust.from_ca(ca, signer="alice"))(X), model(X))
    with pytest.raises(ExportError, match="not by 'bob'"):
        verify_bundle(b, trust=Trust.from_ca(ca, signer="bob"))
    with pytest.raises(ExportError, match="trusted CA"):
        verify_bundle(b, trust=pki / "evil" / "ca.crt")


def test_altered_or_resigned_bundles_are_refused(pki: Path, tmp_path: Path) -> None:
    ca = pki / "fed" / "ca.crt"
    b = save_bundle(MLP(6, 3, [8]), tmp_path / "b", example_inputs=X[:2], sign_with=party(pki, "fed", "alice"))
    original = json.loads((b / SIGNATURE).read_text())

    def edit(m: dict) -> None:
        m["provenance"]["epsilon"] = {"alice": 0.1}  # a careful attacker reseals every hash

    reseal(b, edit)
    with pytest.raises(ExportError, match="another bundle"):
        verify_bundle(b, trust=ca)
    digest = json.loads((b / "manifest.json").read_text())["manifest_sha256"]
    forged = {**original, "digest": digest}  # alice's signature relabelled for the new digest
    (b / SIGNATURE).write_text(json.dumps(forged))
    with pytest.raises(ExportError, match="does not verify"):
        verify_bundle(b, trust=ca)
    sign(b, digest, party(pki, "evil", "alice"))  # re-signed by an impostor CA's "alice"
    with pytest.raises(ExportError, match="trusted CA"):
        verify_bundle(b, trust=ca)
    sign(b, digest, party(pki, "fed", "bob"))  # re-signed by another member: valid, but not the exporter
    assert verify_bundle(b, trust=ca).signer == "bob"
    with pytest.raises(ExportError, match="not by 'alice'"):
        verify_bundle(b, trust=Trust.from_ca(ca, signer="alice"))


def test_signed_handover_and_the_audit_log(pki: Path, tmp_path: Path) -> None:
    ca = pki / "fed" / "ca.crt"
    out = tmp_path / "out"
    signed = save_bundle(MLP(6, 3, [8]), out / "signed", example_inputs=X[:2], party="alice",
                         sign_with=party(pki, "fed", "alice"))
    unsigned = save_bundle(MLP(6, 3, [8]), out / "plain", example_inputs=X[:2], party="alice")
    receiver = BundleReceiver(tmp_path / "recv", trust=ca)
    backend = InProcessBackend(receiver)
    with pytest.raises(ExportError, match="not signed"):
        send_bundle(backend, unsigned, to="serving", who="alice")
    send_bundle(backend, signed, to="serving", who="alice")
    assert verify_bundle(tmp_path / "recv" / "signed", trust=ca).signer == "alice"
    sent = read_audit_log(out / "tessera-audit.jsonl")
    assert [(r["event"], r["who"], r["bundle"]) for r in sent] == [
        ("export", "alice", "signed"), ("export", "alice", "plain"), ("send", "alice", "signed")]
    assert sent[0]["digest"] == sent[2]["digest"] == verify_bundle(signed).digest
    received = read_audit_log(tmp_path / "recv" / "tessera-audit.jsonl")
    assert [(r["event"], r["bundle"]) for r in received] == [("refuse", "plain"), ("receive", "signed")]
    lines = (out / "tessera-audit.jsonl").read_text().splitlines()
    (out / "tessera-audit.jsonl").write_text("\n".join([lines[0], lines[2]]) + "\n")  # a line removed
    with pytest.raises(ExportError, match="hash chain broken"):
        read_audit_log(out / "tessera-audit.jsonl")
