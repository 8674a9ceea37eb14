"""PrivacyLedger against Opacus' own accountants (golden numbers), checkpoint round trips and the budget."""

import math

import pytest
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

from tessera.core import serde
from tessera.core.errors import ConfigError, PrivacyBudgetExceeded
from tessera.privacy import PrivacyLedger

DELTA = 1e-5


def opacus_rdp(history: list[tuple[float, float, int]]) -> float:
    """Opacus' RDPAccountant driven step by step, as its optimizer hook drives it during training."""
    acc = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=DELTA))


@pytest.mark.parametrize(("rounds", "steps", "sigma", "q"),
                         [(5, 20, 1.1, 0.01), (3, 50, 0.8, 0.05), (10, 4, 2.0, 0.25)])
def test_rdp_epsilon_equals_opacus_accountant_over_rounds(rounds: int, steps: int, sigma: float, q: float) -> None:
    # Prepare / Execute: k rounds of m steps each, recorded round by round
    ledger = PrivacyLedger(accountant="rdp", delta=DELTA)
    for _ in range(rounds):
        ledger.step("alice", noise_multiplier=sigma, sample_rate=q, steps=steps)
    # Assert: equal to Opacus fed the same history one step at a time, to 1e-9
    assert ledger.epsilon("alice") == pytest.approx(opacus_rdp([(sigma, q, rounds * steps)]), abs=1e-9)
    assert ledger.epsilon("bob") == 0.0


def test_golden_numbers() -> None:
    # Golden values from Opacus 1.6's RDPAccountant (history set directly), pinned so a change of accountant
    # maths (or of our cached RDP path) shows up: 10 rounds x 100 steps, and MNIST-like 60 epochs of batch 256.
    ledger = PrivacyLedger(delta=DELTA)
    for _ in range(10):
        ledger.step("a", noise_multiplier=1.1, sample_rate=0.01, steps=100)
        ledger.step("b", noise_multiplier=1.0, sample_rate=256 / 60000, steps=6 * 235)
    assert ledger.epsilon("a") == pytest.approx(1.7117700912203435, abs=1e-9)
    assert ledger.epsilon("b") == pytest.approx(3.0831704287613912, abs=1e-9)


def test_changing_sample_rates_compose_like_opacus() -> None:
    ledger = PrivacyLedger(delta=DELTA)
    history = [(1.1, 0.02, 30), (1.1, 0.025, 30), (0.9, 0.025, 10)]  # a client whose dataset shrank, then less noise
    for s, q, n in history:
        ledger.step("c", noise_multiplier=s, sample_rate=q, steps=n)
    assert ledger.epsilon("c") == pytest.approx(opacus_rdp(history), abs=1e-9)
    assert len(ledger.history["c"]) == 3  # entries with a different (sigma, q) are never merged


def test_prv_and_gdp_are_selectable_and_match_opacus() -> None:
    prv = PrivacyLedger(accountant="prv", delta=DELTA)
    for _ in range(4):
        prv.step("a", noise_multiplier=1.0, sample_rate=0.05, steps=25)
    ref = PRVAccountant()
    ref.history = [(1.0, 0.05, 100)]
    assert prv.epsilon("a") == pytest.approx(float(ref.get_epsilon(delta=DELTA)), abs=1e-9)

    with pytest.warns(UserWarning, match="GDP accounting is experimental"):
        gdp = PrivacyLedger(accountant="gdp", delta=DELTA)
    for _ in range(4):
        gdp.step("a", noise_multiplier=1.0, sample_rate=0.05, steps=25)
    with pytest.warns(UserWarning):
        g = GaussianAccountant()
    for _ in range(100):
        g.step(noise_multiplier=1.0, sample_rate=0.05)
    assert gdp.epsilon("a") == pytest.approx(float(g.get_epsilon(delta=DELTA)), abs=1e-9)
    gdp.step("a", noise_multiplier=1.0, sample_rate=0.1, steps=1)
    with pytest.raises(ConfigError, match="gdp"):
        gdp.epsilon("a")


def test_state_dict_survives_serde_and_epsilon_continues() -> None:
    full = PrivacyLedger(delta=DELTA, budget=10.0)
    first = PrivacyLedger(delta=DELTA, budget=10.0)
    for rnd in range(6):
        full.step("alice", noise_multiplier=1.2, sample_rate=0.02 + 0.001 * rnd, steps=40)
        if rnd < 3:
            first.step("alice", noise_multiplier=1.2, sample_rate=0.02 + 0.001 * rnd, steps=40)
    resumed = PrivacyLedger(delta=DELTA, budget=10.0)
    resumed.load_state_dict(serde.loads(serde.dumps(first.state_dict())))  # through the checkpoint format
    for rnd in range(3, 6):
        resumed.step("alice", noise_multiplier=1.2, sample_rate=0.02 + 0.001 * rnd, steps=40)
    assert resumed.epsilon("alice") == full.epsilon("alice")  # continues, not restarts
    assert resumed.epsilon("alice") > first.epsilon("alice") > 0


def test_resume_with_different_settings_is_refused() -> None:
    state = PrivacyLedger(delta=DELTA).state_dict()
    with pytest.raises(ConfigError, match="same dp settings"):
        PrivacyLedger(delta=1e-6).load_state_dict(state)
    with pytest.raises(ConfigError, match="same dp settings"):
        PrivacyLedger(accountant="prv", delta=DELTA).load_state_dict(state)


def test_budget_check_refuses_the_round_that_would_exceed_it() -> None:
    ledger = PrivacyLedger(delta=DELTA, budget=1.0)
    per_round = {"noise_multiplier": 2.0, "sample_rate": 0.05, "steps": 20}
    allowed = 0
    while True:
        try:
            eps = ledger.check("a", **per_round)
        except PrivacyBudgetExceeded as exc:
            assert "nothing was run" in str(exc)
            break
        ledger.step("a", **per_round)
        assert ledger.epsilon("a") == pytest.approx(eps, abs=1e-12)
        allowed += 1
    # Oracle: Opacus accounts `allowed` rounds within the budget and one more round above it
    assert allowed >= 1
    assert ledger.epsilon("a") <= opacus_rdp([(2.0, 0.05, 20 * allowed)]) + 1e-9 <= 1.0 + 1e-9
    assert opacus_rdp([(2.0, 0.05, 20 * (allowed + 1))]) > 1.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"accountant": "moments"}, "dp.accountant"),
    ({"delta": 0.0}, "dp.delta"),
    ({"delta": 1.5}, "dp.delta"),
    ({"budget": -1.0}, "dp.budget"),
])
def test_bad_ledger_settings_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PrivacyLedger(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("sigma", "q", "steps"), [(0.0, 0.1, 1), (math.nan, 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1),
                                                    (1.0, 0.1, -1), (1.0, 0.1, 1.5)])
def test_bad_steps_are_refused(sigma: float, q: float, steps: int) -> None:
    with pytest.raises(ConfigError):
        PrivacyLedger().step("a", noise_multiplier=sigma, sample_rate=q, steps=steps)
