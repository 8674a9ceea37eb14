"""The README's migration example runs, and federated training on the same rows gets close to centralised."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "migrate"))


@pytest.mark.slow
def test_federated_version_of_the_readme_script_matches_centralised_closely() -> None:
    import federated
    import single_machine

    central = single_machine.main(epochs=10)
    fed = federated.main(rounds=10)  # 10 rounds x 1 local epoch over the same rows = 10 epochs of data
    assert central > 0.9
    assert abs(fed - central) < 0.05
