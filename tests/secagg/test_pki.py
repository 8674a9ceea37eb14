"""The party keys SecAgg+ signs with: the certificate-bound PKI of deployments (a signature counts only with a
certificate from the federation CA naming the party) and a whole round with one CertPKI per party."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tessera.core.errors import ConfigError
from tessera.runtime.backend import InProcessBackend
from tessera.runtime.grpc.certs import init_ca, issue
from tessera.runtime.messages import FitIns
from tessera.secagg.messages import Stage
from tessera.secagg.pki import CertPKI, PartyKeys, SimulatedPKI, public_of
from tessera.secagg.plus import SecAggPlus, flatten, run_stages
from tessera.secagg.quantize import sum_error_bound
from tessera.secagg.server import SecAggServer
from tessera.secagg.simulate import _Parties

from .helpers import make_updates

PARTIES = ("server", "alice", "bob", "carol", "dave")
NAMES = {"client0": "alice", "client1": "bob", "client2": "carol", "client3": "dave"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    init_ca(d)
    for p in PARTIES:
        issue(d, p)
    other = d / "other"
    init_ca(other)  # a second CA: its certificates mean nothing to this federation
    issue(other, "alice")
    return d


def pki(certs: Path, party: str, *, ca: Path | None = None, folder: Path | None = None) -> CertPKI:
    f = folder or certs
    return CertPKI.from_files(party, ca_cert=ca or certs / "ca.crt", cert=f / f"{party}.crt", key=f / f"{party}.key",
                              names=NAMES)


def test_a_signature_counts_only_with_a_certificate_naming_the_party(certs: Path) -> None:
    alice, bob, server = pki(certs, "alice"), pki(certs, "bob"), pki(certs, "server")
    sig = alice.sign("client0", b"keys")
    assert server.verify("client0", b"keys", sig, alice.credential("client0"))
    assert not server.verify("client0", b"other keys", sig, alice.credential("client0"))
    assert not server.verify("client1", b"keys", sig, alice.credential("client0"))  # alice's cert is not bob's
    forged = bob.sign("client1", b"keys")
    assert not server.verify("client0", b"keys", forged, bob.credential("client1"))  # bob signing as alice
    rogue = pki(certs, "alice", folder=certs / "other")  # 'alice' certified by another CA
    assert not server.verify("client0", b"keys", rogue.sign("client0", b"keys"), rogue.credential("client0"))
    assert not server.verify("client0", b"keys", sig, b"not a certificate")
    with pytest.raises(ConfigError, match="no certificate key"):
        CertPKI.from_files("server", ca_cert=certs / "ca.crt", cert=certs / "server.crt", key=None).sign("server", b"")
    with pytest.raises(ConfigError, match="not of 'client1'"):
        alice.credential("client1")


def test_party_keys_hook_and_simulated_pki() -> None:
    sim = SimulatedPKI()
    key = bytes(range(32))
    keys = PartyKeys("a", key, {"a": public_of(key), "b": sim.verify_key("b")})
    assert keys.verify("a", b"x", keys.sign("a", b"x")) and not keys.verify("b", b"x", keys.sign("a", b"x"))
    assert keys.verify("b", b"x", sim.sign("b", b"x")) and not SimulatedPKI().verify("b", b"x", sim.sign("b", b"x"))
    with pytest.raises(ConfigError, match="does not match"):
        PartyKeys("a", key, {"a": sim.verify_key("a")})


class PerParty:
    """Each client signs with its own CertPKI; verification through any of them (they share the CA)."""

    def __init__(self, by_client: dict[str, CertPKI]) -> None:
        self.by_client = by_client

    def credential(self, party: str) -> bytes:
        return self.by_client[party].credential(party)

    def sign(self, party: str, data: bytes) -> bytes:
        return self.by_client[party].sign(party, data)

    def verify(self, party: str, data: bytes, signature: bytes, credential: bytes = b"") -> bool:
        return self.by_client["client0"].verify(party, data, signature, credential)


def test_a_round_with_certificate_keys_gives_the_sum(certs: Path) -> None:
    updates = make_updates(4, seed=2)
    clients = list(NAMES)
    parties = PerParty({c: pki(certs, NAMES[c]) for c in clients})
    cfg = SecAggPlus(max_weight=1.0, pki=parties)
    setup = cfg.setup(1, clients, dim=34, graph_seed=0, session=1)
    server = SecAggServer(setup, pki=pki(certs, "server"))
    backend = InProcessBackend(_Parties(updates, {"client3"}, Stage.COLLECT, parties))
    run_stages(server, backend, {c: FitIns(round=1, params={}, config={"seed": i}) for i, c in enumerate(clients)},
               timeout=None)
    assert server.result is not None and server.revealed_sk == {"client3"}
    exact = sum(flatten(u) for u in updates[:3])
    assert float((server.result.values - exact).abs().max()) < sum_error_bound(clients=3, clip=8.0,
                                                                                 levels=setup.levels)
    assert isinstance(server.result.values, torch.Tensor)
