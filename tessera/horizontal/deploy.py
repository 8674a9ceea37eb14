"""A horizontal job deployed as one process per party over gRPC + mTLS (what `tessera party --job` runs).

The coordinator and every client build the same `JobParts` (from the same job.toml). The i-th client party in
federation.toml serves the job's i-th client, and the coordinator uses the job's client ids for seeds, so a
deployed run reproduces the in-process simulation bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tessera.core.errors import ConfigError, PrivacyBudgetExceeded, ProtocolError, RoundFailed, TransportError
from tessera.core.logging import get_logger

if TYPE_CHECKING:
    from tessera.core.metrics import History
    from tessera.horizontal.job import JobParts
    from tessera.horizontal.scheduling import Scheduling
    from tessera.horizontal.server import Server
    from tessera.runtime.grpc.config import FederationConfig
    from tessera.runtime.grpc.party import ClientStats
    from tessera.runtime.grpc.process import Notify, Stopper

log = get_logger(__name__)


def client_routes(fed: FederationConfig, clients: list[str]) -> dict[str, str]:
    """Job client id -> party name: the i-th client party serves the i-th partition."""
    names = fed.client_names
    if len(names) != len(clients):
        raise ConfigError(f"the job has {len(clients)} clients (data.num_clients) but {fed.source} lists "
                          f"{len(names)} client parties; make them equal (the i-th client party serves partition i)")
    return dict(zip(clients, names, strict=True))


def run_coordinator(fed: FederationConfig, parts: JobParts, *, rounds: int, seed: int, output_dir: str | Path,
                    checkpoint_every: int = 1, resume: bool = False, overwrite: bool = False, plots: bool = True,
                    loggers: tuple[str, ...] = (), notify: Notify = log.info,
                    scheduling: Scheduling | None = None) -> History:
    """Drive `rounds` rounds over the federation's client parties. SIGTERM/SIGINT once: finish the round in
    flight, checkpoint, return; twice: abandon it. A spent privacy budget ends the run cleanly, as in simulation.
    Writes metrics, checkpoint, transport.json (one labelled entry per session) and plots.

    A folder that already holds a run is refused unless `resume` (continue it) or `overwrite` (replace it), and a
    session that ran no round leaves the folder's checkpoint as it was. `scheduling`: the policy (default
    synchronous rounds; realtime.Deadline / Asynchronous dispatch each client's request from their own threads)."""
    from tessera.core.metrics import plot_history
    from tessera.core.runfolder import claim
    from tessera.horizontal.server import Server, ServerConfig
    from tessera.horizontal.simulation import initial_params
    from tessera.runtime.grpc.backend import GrpcBackend
    from tessera.runtime.grpc.process import Stopper, check_identity, write_transport

    check_identity(fed.coordinator)
    backend = GrpcBackend(fed, client_routes(fed, parts.clients), min_clients=parts.strategy.min_available,
                          return_memory=True)  # this process only coordinates: nothing here trains
    port = backend.listen()  # before the folder is claimed: a busy port leaves even an --overwrite run untouched
    try:
        claim(output_dir, resume=resume, overwrite=overwrite, where="job.output_dir")
    except ConfigError:
        backend.close()
        raise
    server = Server(strategy=parts.strategy, backend=backend, clients=parts.clients,
                    initial_params=initial_params(parts.task, seed),
                    config=ServerConfig(rounds=rounds, seed=seed, output_dir=output_dir, loggers=loggers,
                                        checkpoint_every=checkpoint_every, fit_timeout=fed.settings.round_deadline_s),
                    aggregation=parts.aggregation, central_eval=parts.central_eval, extensions=parts.extensions,
                    scheduling=scheduling)
    stopper = Stopper(backend)
    if resume:
        server.resume()
        notify(f"resumed from round {server.round} (checkpoint in {output_dir})")
    first = server.round
    notify(f"coordinator {fed.coordinator.name} listening on port {port}; waiting for {len(parts.clients)} clients")
    try:
        try:
            backend.start(parts.clients)
        except TransportError:
            if not stopper.requested:
                raise
        _rounds(server, rounds, stopper, notify)
    finally:
        if server.round > first:
            server.save_checkpoint()
        backend.close()
        if server.writer is not None:
            server.writer.close()
        if server.round > first or backend.refused or backend.traffic.up or backend.traffic.down:
            write_transport(Path(output_dir), backend, label={"rounds": [first + 1, server.round]})
    if plots and len(server.history):
        plot_history(server.history, output_dir)
    return server.history


def _rounds(server: Server, rounds: int, stopper: Stopper, notify: Notify) -> None:
    every = server.config.checkpoint_every
    while server.round < rounds and not stopper.requested:
        rnd = server.round + 1
        try:
            record = server.run_round(rnd)
        except PrivacyBudgetExceeded as exc:  # a spent budget ends the run; it does not fail it (as simulate)
            server.stopped = str(exc)
            notify(f"run stopped before round {rnd}: {exc}")
            return
        except (RoundFailed, ProtocolError):  # a second signal fails every request in flight
            if stopper.requested:
                notify(f"round {rnd} abandoned on shutdown; the checkpoint holds round {server.round}")
                return
            raise
        server.round = rnd
        server.history.append(record)
        if server.writer is not None:
            server.writer.write(record)
        if rnd % every == 0 or rnd == rounds:
            server.save_checkpoint()
        notify(f"round {rnd} done: {record['clients_succeeded']} ok, {record['clients_failed']} failed, "
               f"train_loss {record.get('train_loss', float('nan')):.4f}")
    if stopper.requested:
        notify(f"stopped on signal after round {server.round}; resume with --resume")


def run_client(fed: FederationConfig, name: str, parts: JobParts, *, state_dir: str | Path | None = None,
               notify: Notify = log.info) -> ClientStats:
    """Serve party `name`'s client of the job until the coordinator says BYE (or a signal stops it).

    With `state_dir`, the client's state (privacy ledger, SecAgg+ replay state, SCAFFOLD variate) is reloaded from
    it at start and saved there after every request (horizontal/state_store.py), so a restart continues it."""
    from tessera.horizontal.state_store import ClientStateStore, PersistentClientApp
    from tessera.runtime.backend import Handler
    from tessera.runtime.grpc.party import ClientParty
    from tessera.runtime.grpc.process import serve

    client_id = next(c for c, p in client_routes(fed, parts.clients).items() if p == name)
    app = parts.client_app()
    handler: Handler = app
    if state_dir is not None:  # a corrupt state file fails here, in one line, before any connection
        handler = stored = PersistentClientApp(app, ClientStateStore(state_dir))
        if stored.restore(client_id) is not None:
            notify(f"party {name} (client {client_id}) continues its state from {state_dir}")
    party = ClientParty(fed, name, handler, expected_client_id=client_id)
    return serve(party, f"party {name} (client {client_id}) dialling {fed.coordinator.address}", notify=notify)
