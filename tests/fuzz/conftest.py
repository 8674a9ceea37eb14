"""The fuzz suite: every decoder that reads bytes from a peer or a disk, driven by hypothesis with a fixed seed
(`derandomize=True`) and a fixed budget, checking one property: nothing but a `TesseraError` ever comes out.

Budget: `TESSERA_FUZZ_EXAMPLES` inputs per target (a short pass by default, so the normal test run includes it;
`make fuzz` runs a larger one). At the end pytest prints how many inputs each target tried.

Adding a target (other areas add files here, e.g. `test_fuzz_bundle.py`, `test_fuzz_secagg.py`)::

    from tests.fuzz.conftest import FUZZ, only_tessera_errors

    @FUZZ
    @given(st.binary())
    def test_my_decoder(data: bytes) -> None:
        only_tessera_errors("my decoder", my_decode, data)
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tessera.core.errors import TesseraError

EXAMPLES = int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
TRIED: Counter[str] = Counter()  # inputs tried per target
REFUSED: Counter[str] = Counter()  # of which refused with a TesseraError (the rest decoded)
ESCAPED: Counter[str] = Counter()  # any other exception: a bug (the test fails)


def only_tessera_errors(target: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call `fn(*args)`; a TesseraError is a correct refusal, any other exception fails the test (and hypothesis
    shrinks the input that raised it)."""
    TRIED[target] += 1
    try:
        return fn(*args)
    except TesseraError:
        REFUSED[target] += 1
        return None
    except Exception:
        ESCAPED[target] += 1
        raise


def mutations(max_ops: int = 6) -> st.SearchStrategy[list[tuple[int, int, int]]]:
    """Edits to apply to a valid blob: (op, position, byte) with op 0 flip, 1 set, 2 insert, 3 delete, 4 truncate."""
    return st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2**31), st.integers(0, 255)), min_size=1,
                    max_size=max_ops)


def mutate(blob: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(blob)
    for op, pos, byte in ops:
        if not b:
            break
        i = pos % len(b)
        if op == 0:
            b[i] ^= 1 << (byte % 8)
        elif op == 1:
            b[i] = byte
        elif op == 2:
            b.insert(i, byte)
        elif op == 3:
            del b[i]
        else:
            del b[i:]
    return bytes(b)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TRIED:
        return
    terminalreporter.section("fuzz")
    for target in sorted(TRIED):
        terminalreporter.write_line(f"{target}: {TRIED[target]} inputs, {REFUSED[target]} refused with a "
                                    f"TesseraError, {ESCAPED[target]} other exceptions")
    terminalreporter.write_line(f"total: {sum(TRIED.values())} inputs (budget {EXAMPLES} per test)")
    report = os.environ.get("TESSERA_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps({"examples_per_test": EXAMPLES, "tried": dict(TRIED),
                                            "refused": dict(REFUSED), "escaped": dict(ESCAPED)}, indent=1))
