"""The coordinator against an authenticated but hostile party (issue 16 item 5, issue 19's ceiling), over real
loopback gRPC + mTLS in one process.

Oracles: the honest parties' replies equal what the handler computes from the exact request; the attacker's
streams end with the stated status and reason; the attack's precondition is checked on the attacker's own input
(the certificate really names bob in its SAN, the reply really is hostile to a naive decoder).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
import torch
from cryptography import x509

from tessera.core import serde
from tessera.core.errors import ConfigError, TransportError
from tessera.runtime.backend import ClientFailure, FailureKind
from tessera.runtime.grpc import ClientParty, GrpcBackend
from tessera.runtime.grpc import transport as tp
from tessera.runtime.grpc.certs import PARTY_DOMAIN, issue
from tessera.runtime.grpc.config import build
from tessera.runtime.messages import FitIns, FitRes
from tests.e2e.grpc_helpers import open_session
from tests.runtime.test_grpc_backend import ROUTES, Echo
from tests.runtime.test_grpc_failures import _until


def _fit(n: int, rnd: int = 1) -> FitIns:
    return FitIns(round=rnd, params={"w": torch.arange(n, dtype=torch.float32)})


def _served(replies: dict[str, Any], cids: tuple[str, ...], n: int) -> bool:
    want = torch.arange(n, dtype=torch.float32) + 1
    return all(isinstance(replies[c], FitRes) and torch.equal(replies[c].params["w"], want) for c in cids)


def test_one_party_holding_ten_streams_without_hello_cannot_lock_the_others_out(start: Any, certs: Path) -> None:
    r = start((), hello_deadline_s=60)  # a long HELLO deadline: the per-party stream limit alone must hold
    hold = threading.Event()
    codes: list[grpc.StatusCode] = []

    def silent() -> Iterator[bytes]:
        hold.wait(60)
        yield from ()

    def attack() -> None:
        codes.append(open_session(r.fed, cert=certs / "carol.crt", claim="carol", send=silent(), timeout=60))

    attackers = [threading.Thread(target=attack, daemon=True) for _ in range(10)]
    try:
        for t in attackers:
            t.start()
        limit = r.fed.settings.max_streams_per_party
        _until(lambda: len(codes) == 10 - limit)  # all but `limit` streams are turned away at once
        assert codes == [grpc.StatusCode.UNAVAILABLE] * (10 - limit)
        assert [x.claimed for x in r.backend.refused] == ["carol"] * (10 - limit)
        assert all("already holds" in x.reason for x in r.backend.refused)
        r.add_clients(("alice", "bob"))  # carol still holds her streams open, silent
        assert r.backend.wait_for(["c0", "c1"], 20) == ["c0", "c1"]
        assert _served(r.backend.exchange({"c0": _fit(5), "c1": _fit(5)}), ("c0", "c1"), 5)
        assert "c2" not in r.backend.connected()
    finally:
        hold.set()
        for t in attackers:
            t.join(20)


def test_a_certificate_with_bob_among_its_extra_dns_names_is_not_bob(start: Any, certs: Path,
                                                                      tmp_path: Path) -> None:
    r = start(("alice",))
    crt, _ = issue(tmp_path, "dave", ca_dir=certs, hosts=("bob", "localhost", "127.0.0.1"))
    san = x509.load_pem_x509_certificate(crt.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "bob" in san  # the attack's precondition: a genuine federation certificate that names bob
    hello = tp.control(tp.Kind.HELLO, b"bob")
    assert open_session(r.fed, cert=crt, claim="bob", send=[hello]) == grpc.StatusCode.PERMISSION_DENIED
    assert r.backend.refused[-1].claimed == "bob" and "not issued to 'bob'" in r.backend.refused[-1].reason
    assert "c1" not in r.backend.connected()


def test_a_certificate_with_server_among_its_extra_dns_names_cannot_act_as_the_coordinator(certs: Path,
                                                                                         tmp_path: Path) -> None:
    for f in ["ca.crt", *(f"{n}.{ext}" for n in ROUTES.values() for ext in ("crt", "key"))]:
        (tmp_path / f).write_bytes((certs / f).read_bytes())
    issue(tmp_path, "dave", ca_dir=certs, hosts=("server", "localhost", "127.0.0.1"))

    def fed(port: int, cert: str) -> Any:
        parties = [{"name": "server", "role": "coordinator", "address": f"127.0.0.1:{port}", "cert": f"{cert}.crt",
                    "key": f"{cert}.key"}, *({"name": n} for n in ROUTES.values())]
        settings = {"ca_cert": "ca.crt", "certs_dir": ".", "retry": {"initial_backoff_s": 0.01, "max_attempts": 2}}
        return build({"federation": settings, "parties": parties}, source="test", base=tmp_path)

    impostor = GrpcBackend(fed(0, "dave"), dict(ROUTES))  # genuine, and its SAN lists DNS=server
    port = impostor.listen()
    try:
        with pytest.raises(TransportError, match="could not reach the coordinator"):
            ClientParty(fed(port, "server"), "bob", Echo()).run()
        assert impostor.connected() == [] and impostor.refused == []  # the TLS handshake failed: no stream
    finally:
        impostor.close()
    with pytest.raises(ConfigError, match="identify parties"):
        issue(tmp_path, "eve", ca_dir=certs, hosts=(f"server{PARTY_DOMAIN}",))


def _nested(depth: int) -> object:
    value: object = 1.0
    for _ in range(depth - 1):
        value = [value]
    return value


def _forged(header: object, body: bytes = b"") -> list[bytes]:
    h: bytes = msgpack.packb(header, use_bin_type=True)
    return [serde.MAGIC + len(h).to_bytes(4, "little") + h + bytes(-(8 + len(h)) % serde.ALIGN) + body]


DEEP = _forged({"type": "FitRes", "fields": {"params": {}, "num_examples": 1, "metrics": {"m": _nested(600)},
                                             "extras": {}}})
OVERLAP = _forged({"type": "FitRes", "fields": {"params": {f"w{i}": {"$t": ["float32", [256], 0, 1024]}
                                                           for i in range(200)}, "num_examples": 1, "metrics": {},
                                                "extras": {}}}, bytes(1024))


@pytest.mark.parametrize(("hostile", "match"), [(DEEP, "deeper than"), (OVERLAP, "overlap"),
                                                ([b"not a message at all"], "bad magic")])
def test_a_malformed_reply_fails_that_client_and_the_others_are_served(start: Any, hostile: list[bytes],
                                                                       match: str) -> None:
    r = start(("alice", "bob", "carol"))
    r.clients["carol"]._answer = lambda blob: hostile  # type: ignore[method-assign]  # carol's process answers every request with these bytes
    for rnd in (1, 2):  # the coordinator keeps serving, and keeps carol's stream: the next round is the same
        replies = r.backend.exchange({c: _fit(7, rnd) for c in ("c0", "c1", "c2")})
        assert _served(replies, ("c0", "c1"), 7)
        assert isinstance(replies["c2"], ClientFailure) and "undecodable" in replies["c2"].reason
        assert replies["c2"].kind is FailureKind.MALFORMED
        assert match in replies["c2"].reason
    assert r.backend.connected() == ["c0", "c1", "c2"]


def test_without_max_message_bytes_the_ceiling_follows_the_model(start: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tp, "AUTO_FLOOR", 64 * 1024)  # stands in for the 64 MiB floor (and protobuf's 2 GiB)
    r = start(("alice", "bob"))
    assert r.fed.settings.max_message_bytes is None
    n = 250_000  # a 1 MB model: 15x the floor, ~50x gRPC's own message limit here (chunk_bytes + slack)
    grpc_limit = dict(tp.channel_options(r.fed))["grpc.max_receive_message_length"]
    assert n * 4 > 15 * tp.AUTO_FLOOR and n * 4 > 45 * int(grpc_limit)
    assert _served(r.backend.exchange({"c0": _fit(n), "c1": _fit(n)}), ("c0", "c1"), n)
    # a reply far beyond what this job's model explains is refused from its first frame header
    small, big = _fit(10, 2), serde.encode_message_parts(FitRes(params={"w": torch.zeros(1_100_000)}, num_examples=1))
    limit, _ = tp.ceiling(None, largest_sent=len(serde.encode_message(_fit(n))))
    assert serde.parts_size(big) > limit
    r.clients["bob"]._answer = lambda blob: big  # type: ignore[method-assign]
    replies = r.backend.exchange({"c0": small, "c1": small})
    assert _served(replies, ("c0",), 10) and isinstance(replies["c1"], ClientFailure)
    assert "refused before allocating" in replies["c1"].reason and "follows the model" in replies["c1"].reason
    assert replies["c1"].kind is FailureKind.MALFORMED
    _until(lambda: "bob" in r.errors)  # told why (RESOURCE_EXHAUSTED is final), bob's party stops
    assert "exceeds the ceiling" in str(r.errors["bob"])


def test_a_declared_size_beyond_the_ceiling_is_refused_before_allocation(start: Any, certs: Path) -> None:
    r = start(("alice",))
    huge = tp.HEADER.pack(tp.MAGIC, tp.Kind.DATA, 1, 0, 1, 3 * 1024**4, 0) + b"x"  # claims 3 TiB
    frames = [tp.control(tp.Kind.HELLO, b"carol"), huge]
    assert open_session(r.fed, cert=certs / "carol.crt", claim="carol", send=frames) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED  # had it been allocated, this process would be gone
    _until(lambda: bool(r.backend.refused))
    assert "refused before allocating" in r.backend.refused[-1].reason
    assert _served(r.backend.exchange({"c0": _fit(3)}), ("c0",), 3)
