"""The Python snippets of docs/privacy.md run as written (one namespace, in order)."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "privacy.md"


@pytest.mark.slow
def test_privacy_doc_snippets_run(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # our own documentation
    out = capsys.readouterr().out
    assert "1.71177009" in out  # the golden epsilon the ledger snippet promises
    history = namespace["history"]
    assert history.last["epsilon"]["client-level"] > 0  # type: ignore[attr-defined]
