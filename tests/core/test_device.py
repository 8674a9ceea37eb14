"""One device setting: bad settings are one clear error each, device="cpu" equals today's default bit for bit in
every kind of training, and placement is real (models and batches reach the device, the wire stays on the CPU).

No test here needs a GPU; the GPU comparisons are in test_device_gpu.py (marked `gpu`)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tessera
from tessera.core.device import Placement, check_precision, device_of, resolve_device
from tessera.core.errors import ConfigError
from tessera.core.types import get_params, set_params
from tessera.horizontal.client import ClientContext, TaskClient
from tessera.horizontal.task import SupervisedTask
from tessera.privacy.opacus import DPConfig, DPTrainer
from tessera.runtime.messages import FitIns


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int, *, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


# ------------------------------------------------------------------------------------------------ bad settings
@pytest.mark.parametrize(("device", "gpus", "match"), [
    ("cuda", 0, r"device='cuda': this machine has no CUDA GPU .*use device='cpu' or device='auto'"),
    ("cuda:0", 0, r"no CUDA GPU"),
    ("cuda:3", 1, r"device='cuda:3': this machine has 1 CUDA GPU \(cuda:0..cuda:0\); pick one of those"),
    ("cuda:x", 1, r"'cuda' or 'cuda:N' with N a GPU index"),
    ("tpu", 0, r"device='tpu' is not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
])
def test_bad_device_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, device: str, gpus: int, match: str) -> None:
    _fake_gpus(monkeypatch, gpus)
    with pytest.raises(ConfigError, match=match) as err:
        resolve_device(device)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(sys.platform == "darwin", reason="MPS may exist on macOS")
def test_mps_off_macos_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"device='mps': Apple's MPS backend exists only on macOS"):
        resolve_device("mps")


def test_auto_prefers_cuda_then_cpu_without_touching_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    _fake_gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("CUDA") == torch.device("cuda", 0)


@pytest.mark.parametrize(("precision", "device", "bf16", "match"), [
    ("bf16", "cuda", False, r"precision='bf16': cuda:0 has no bfloat16 support .*use precision='fp16'"),
    ("fp16", "cpu", True, r"precision='fp16' on the CPU: CPU autocast is for bfloat16"),
    ("16", "cpu", True, r"precision='16': use '32' \(full precision\), 'bf16' or 'fp16'"),
])
def test_bad_precision_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, precision: str, device: str, bf16: bool,
                                          match: str) -> None:
    _fake_gpus(monkeypatch, 1, bf16=bf16)
    with pytest.raises(ConfigError, match=match):
        Placement.of(device, precision)


def test_fp16_on_a_gpu_gets_a_grad_scaler_and_bf16_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpus(monkeypatch, 1)
    assert check_precision("fp16", torch.device("cuda", 0)) == "fp16"
    assert Placement(torch.device("cpu"), "bf16").scaler() is None
    assert Placement(torch.device("cpu"), "32").scaler() is None


def test_bad_device_reaches_the_user_from_every_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpus(monkeypatch, 0)
    net = nn.Linear(3, 2)
    sgd: Any = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        tessera.FLModel(parties=["a"], model=net, loss_fn=nn.CrossEntropyLoss(), optimizer_fn=sgd, device="cuda")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        SupervisedTask(model_fn=lambda: net, loss_fn=nn.MSELoss(), optimizer_fn=sgd, data_fn=lambda c: (None, None),
                       device="cuda:0")
    with pytest.raises(ConfigError, match="device of bob='cuda'"):
        tessera.SLModel(base_models={"alice": nn.Linear(2, 2), "bob": nn.Linear(2, 2)}, fuse_model=_SumFuse(),
                        label_party="alice", loss_fn=nn.MSELoss(), optimizer_fn=sgd, device={"bob": "cuda"})
    with pytest.raises(ConfigError, match=r"device names \['carol'\], which are not parties"):
        tessera.SLModel(base_models={"alice": nn.Linear(2, 2), "bob": nn.Linear(2, 2)}, fuse_model=_SumFuse(),
                        label_party="alice", loss_fn=nn.MSELoss(), optimizer_fn=sgd, device={"carol": "cpu"})


class _SumFuse(nn.Module):
    def forward(self, embs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(embs).sum(0)


# ------------------------------------------------------------------------------- device="cpu" == today's default
def _digits(parties: int = 2, rows: int = 48) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return ([torch.randn(rows, 6, generator=g) for _ in range(parties)],
            [torch.randint(0, 3, (rows,), generator=g) for _ in range(parties)])


def _fl(**kw: Any) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, Any]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    xs, ys = _digits()
    fl = tessera.FLModel(parties=["a", "b"], model=net, loss_fn=nn.CrossEntropyLoss(),
                         optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), **kw)
    history = fl.fit(x=xs, y=ys, rounds=2, batch_size=8)
    records = [{k: v for k, v in r.items() if k != "seconds"} for r in history]
    return get_params(fl.model), records, fl.evaluate(x=xs, y=ys)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k, t in a.items():
        assert t.dtype == b[k].dtype and torch.equal(t, b[k]), k


def test_flmodel_device_cpu_is_bit_identical_to_the_default() -> None:
    p0, h0, e0 = _fl()
    p1, h1, e1 = _fl(device="cpu")
    _same(p0, p1)
    assert h0 == h1 and e0 == e1


def test_flmodel_bf16_on_cpu_trains_close_to_fp32_and_keeps_fp32_params() -> None:
    p0, _, e0 = _fl()
    p1, _, e1 = _fl(device="cpu", precision="bf16")
    assert all(t.dtype == torch.float32 for t in p1.values())  # autocast: the weights stay float32
    assert not all(torch.equal(p0[k], p1[k]) for k in p0)  # it did run in bf16
    assert abs(e0["loss"] - e1["loss"]) < 0.05


def _sl(**kw: Any) -> tuple[dict[str, torch.Tensor], list[float]]:
    from tests.vertical.helpers import make_data, make_split

    bases, fuse = make_split()
    x, y = make_data()
    sl = tessera.SLModel(base_models=bases, fuse_model=fuse, label_party="alice", loss_fn=nn.BCEWithLogitsLoss(),
                         optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1), **kw)
    history = sl.fit(x=x, y=y, epochs=2, batch_size=16)
    params = {f"{p}.{k}": v for p, m in sl.base_models.items() for k, v in get_params(m).items()}
    params.update({f"fuse.{k}": v for k, v in get_params(sl.fuse_model).items()})
    return params, [r["train_loss"] for r in history]


def test_slmodel_device_cpu_and_per_party_dict_are_bit_identical_to_the_default() -> None:
    p0, l0 = _sl()
    for device in ("cpu", {"alice": "cpu", "bob": "cpu"}, {"bob": "cpu"}):
        p1, l1 = _sl(device=device)
        _same(p0, p1)
        assert l0 == l1


def _dp(**kw: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    xs, ys = _digits(1, 64)
    trainer = DPTrainer(model, lambda p: torch.optim.SGD(p, lr=0.2),
                        config=DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, reproducible=True), **kw)
    metrics: dict[str, float] = {}
    for rnd in range(2):
        metrics = trainer.train(DataLoader(TensorDataset(xs[0], ys[0]), batch_size=16),
                                loss_fn=nn.CrossEntropyLoss(), seed=rnd)
    return trainer.params(), metrics


def test_dpsgd_device_cpu_is_bit_identical_to_the_default() -> None:
    p0, m0 = _dp()
    p1, m1 = _dp(device="cpu")
    _same(p0, p1)
    assert m0 == m1


def test_dpsgd_refuses_mixed_precision_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"precision='bf16': DP-SGD trains in full precision only: .*clipping"):
        DPTrainer(nn.Linear(3, 2), lambda p: torch.optim.SGD(p, lr=0.1), config=DPConfig(noise_multiplier=1.0),
                  precision="bf16")
    with pytest.raises(ConfigError, match=r"dp: precision='fp16': DP-SGD trains in full precision only"):
        DPConfig(noise_multiplier=1.0, precision="fp16")


def test_dpsgd_through_flmodel_refuses_a_task_in_mixed_precision() -> None:
    from tessera.privacy import DPSGD

    with pytest.raises(ConfigError, match="DP-SGD trains in full precision only"):
        _fl(device="cpu", precision="bf16", dp=DPSGD(noise_multiplier=1.0))


# ------------------------------------------------------------------------------------------ placement is real
class Recording(nn.Module):
    """A module that records the device of every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.seen: list[torch.device] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.device)
        return self.fc(x)


def _task(device: str | None, built: list[nn.Module]) -> SupervisedTask:
    ds = TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))

    def model_fn() -> nn.Module:
        built.append(Recording())
        return built[-1]

    return SupervisedTask(model_fn=model_fn, loss_fn=nn.CrossEntropyLoss(),
                          optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1),
                          data_fn=lambda c: (DataLoader(ds, batch_size=4), None), device=device)


def test_models_are_placed_once_and_batches_reach_the_device() -> None:
    """On the meta device (shapes, no values): the model is built and placed once per client thread, global
    params load into it in place (the same tensors before and after), and every batch reaches it on meta."""
    built: list[nn.Module] = []
    client = TaskClient(_task("meta", built))
    model = client.model()
    assert client.model() is model and len(built) == 1
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}
    before = [id(p) for p in model.parameters()]
    set_params(model, get_params(Recording()))
    assert [id(p) for p in model.parameters()] == before
    train, _ = client.data("a", 1)
    metrics = client.task.train(model, train, {"local_epochs": 2})
    assert metrics["steps"] == 8.0
    assert set(built[0].seen) == {torch.device("meta")} and len(built[0].seen) == 8  # type: ignore[arg-type]


def test_what_crosses_the_wire_is_on_the_cpu_in_its_dtype() -> None:
    built: list[nn.Module] = []
    client = TaskClient(_task("cpu", built))
    res = client.fit(FitIns(round=1, params=get_params(Recording()), config={}), ClientContext("a"))
    assert {t.device.type for t in res.params.values()} == {"cpu"}
    assert {t.dtype for t in res.params.values()} == {torch.float32}
    assert device_of(client.model()).type == "cpu"
    assert set(built[0].seen) == {torch.device("cpu")}  # type: ignore[arg-type]


def test_split_parties_send_cpu_tensors() -> None:
    from tessera.vertical.messages import Backward, Forward
    from tests.vertical.helpers import make_data, make_split

    bases, fuse = make_split()
    x, y = make_data()
    sent: list[Any] = []
    sl = tessera.SLModel(base_models=bases, fuse_model=fuse, label_party="alice", loss_fn=nn.BCEWithLogitsLoss(),
                         optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1), device={"alice": "cpu", "bob": "cpu"})
    inner = sl.backend.exchange

    def spy(requests: Any, **kw: Any) -> Any:
        sent.extend(requests.values())
        replies = inner(requests, **kw)
        sent.extend(replies.values())
        return replies

    sl.backend.exchange = spy  # type: ignore[method-assign]
    sl.fit(x=x, y=y, epochs=1, batch_size=16)
    tensors = [m.embedding for m in sent if isinstance(m, Forward)] + [m.grad for m in sent if isinstance(m, Backward)]
    assert tensors and {t.device.type for t in tensors} == {"cpu"}


# ------------------------------------------------------------------------------- job.toml, federation.toml, Ray
def _job(tmp_path: Any, train: str) -> Any:
    from tessera.core.config import load_job

    path = tmp_path / "job.toml"
    path.write_text(f"[job]\nrounds = 1\n[data]\nnum_clients = 2\n[train]\n{train}\n")
    return load_job(path)


def test_job_toml_train_device_and_precision_reach_the_task(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from tessera.cli.jobs import build_parts

    cfg = _job(tmp_path, 'device = "cpu"\nprecision = "bf16"')
    task = build_parts(cfg).task
    assert isinstance(task, SupervisedTask)
    assert task.placement == Placement(torch.device("cpu"), "bf16", spec="cpu")
    default = build_parts(_job(tmp_path, "")).task
    assert isinstance(default, SupervisedTask) and not default.placement.explicit
    _fake_gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match="device='cuda': this machine has no CUDA GPU"):
        build_parts(cfg, device="cuda")  # `tessera party --device cuda` overrides [train]


def test_job_toml_bad_precision_is_one_line(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"train.precision: Input should be '32', 'bf16' or 'fp16'"):
        _job(tmp_path, 'precision = "16"')


def test_federation_party_device_is_read() -> None:
    from tessera.runtime.grpc.config import FederationFile

    raw = FederationFile.model_validate({"parties": [
        {"name": "server", "role": "coordinator", "address": "127.0.0.1:5"},
        {"name": "alice", "device": "cuda:0"}]})
    assert [p.device for p in raw.parties] == [None, "cuda:0"]


@pytest.mark.parametrize(("opts", "resources", "clients", "size"), [
    ({}, {"CPU": 8.0}, 100, 8),
    ({"actor_gpus": 0.5}, {"CPU": 16.0, "GPU": 1.0}, 100, 2),  # never more GPU actors than fit
    ({"actor_gpus": 0.25, "num_actors": 10}, {"CPU": 16.0, "GPU": 2.0}, 100, 8),
    ({"actor_gpus": 1.0}, {"CPU": 16.0, "GPU": 4.0}, 3, 3),
    ({"actor_gpus": 0.3}, {"CPU": 16.0, "GPU": 0.9}, 100, 3),
])
def test_ray_pool_never_starts_more_gpu_actors_than_fit(opts: dict[str, Any], resources: dict[str, float],
                                                        clients: int, size: int) -> None:
    from tessera.runtime.ray.options import RayOptions

    options = RayOptions(**opts)
    assert options.pool_size(resources, clients) == size
    if options.actor_gpus:
        assert options.actor_options()["num_gpus"] == options.actor_gpus


def test_ray_actor_gpus_without_gpus_is_one_clear_error() -> None:
    from tessera.runtime.ray.options import RayOptions

    with pytest.raises(ConfigError, match=r"ray: actor_gpus=0.5 but the Ray cluster has 0 GPUs"):
        RayOptions(actor_gpus=0.5).pool_size({"CPU": 4.0}, 10)


def test_a_shipped_task_resolves_its_device_where_it_lands(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task sent to a Ray actor re-resolves "auto" there (Ray shows an actor only the GPU it assigned)."""
    import pickle

    placement = Placement.of("auto")
    assert placement.device == torch.device("cpu")
    _fake_gpus(monkeypatch, 1)
    assert pickle.loads(pickle.dumps(placement)).device == torch.device("cuda", 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    _fake_gpus(monkeypatch, 0)
    with pytest.raises(ConfigError, match=r"CUDA_VISIBLE_DEVICES is empty, as in a Ray actor given no GPU"):
        pickle.loads(pickle.dumps(Placement(torch.device("cuda", 0), spec="cuda")))
