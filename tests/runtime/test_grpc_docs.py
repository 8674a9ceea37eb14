"""The Python snippet in docs/deployment.md runs as written (in a scratch folder, on a free port)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"


def test_the_python_snippet_in_the_deployment_doc_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0].replace("127.0.0.1:50061", f"127.0.0.1:{port}"), str(DOC), "exec"), {})
    assert capsys.readouterr().out.strip().splitlines()[-1] == "[2, 2]"
