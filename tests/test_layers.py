"""DESIGN.md's layer rules, checked on the AST of every module: imports go downwards only.

Each rule is a (layer, forbidden layer) pair computed from the import statements (module-level and local, lazy
imports included), so a violation fails here whichever way it was written.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tessera"

# Bottom to top. A module may import its own layer and any layer of a lower rank; layers of one rank are siblings
# that may not import each other unless allowed below.
RANK = {"core": 0, "runtime": 1, "export": 2, "vertical": 3, "horizontal": 3, "privacy": 4, "secagg": 4, "llm": 5,
        "api": 6, "demos": 7, "cli": 8}
SIBLINGS_ALLOWED: set[tuple[str, str]] = set()
# Plugins reach horizontal only through its contract modules, never the round loop.
HORIZONTAL_CONTRACT = {"tessera.horizontal.task", "tessera.horizontal.strategies", "tessera.horizontal.job",
                       "tessera.horizontal.aggregation", "tessera.horizontal.client",
                       "tessera.horizontal.strategies.base", "tessera.horizontal.strategies.aggregate",
                       "tessera.horizontal.strategies.clipping"}
PURE_MATHS = {"tessera.secagg.shamir", "tessera.secagg.prg", "tessera.secagg.quantize", "tessera.secagg.graph",
              "tessera.secagg.crypto", "tessera.privacy.ledger"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "tessera" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in RANK else None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports (absolute names), with line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
            out.extend((node.lineno, f"{base}.{a.name}") for a in node.names)
    return out


def violations(path: Path) -> list[str]:
    me = module_name(path)
    mine = layer_of(me)
    bad: list[str] = []
    for line, target in imports(path):
        theirs = layer_of(target)
        if mine is None or theirs is None or theirs == mine:
            continue
        where = f"{path.relative_to(ROOT)}:{line} imports {target}"
        if RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine] and (mine, theirs) not in SIBLINGS_ALLOWED):
            bad.append(f"{where} ({mine} may not import {theirs})")
        elif theirs == "demos" and mine != "cli":
            bad.append(f"{where} (only cli imports demos)")
        elif mine in ("privacy", "secagg") and theirs == "horizontal" and not _contract(target):
            bad.append(f"{where} (plugins use horizontal's contract modules, never the round loop)")
        if me in PURE_MATHS and theirs != "core":
            bad.append(f"{where} (pure protocol maths imports core only)")
    return bad


def _contract(target: str) -> bool:
    return any(target == c or target.startswith(c + ".") for c in HORIZONTAL_CONTRACT) or \
        target == "tessera.horizontal"


def test_library_imports_follow_the_layers() -> None:
    found = [v for p in sorted(PKG.rglob("*.py")) if "_pb2" not in p.name for v in violations(p)]
    assert found == [], "\n".join(found)


def test_tests_and_examples_never_import_demos() -> None:
    # Benchmarks sit beside the demos (neither is library code) and may time a demo's experiment; tests build
    # their own fixtures and examples show the library alone.
    found: list[str] = []
    for folder in ("tests", "examples"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            found += [f"{p.relative_to(ROOT)}:{line} imports {t}" for line, t in imports(p)
                      if t == "tessera.demos" or t.startswith("tessera.demos.")]
    assert found == [], "\n".join(found)


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    fake = PKG / "runtime" / "_layer_probe.py"
    fake.write_text("from tessera.horizontal.client import ClientContext\nimport tessera.demos.hfl\n")
    try:
        found = violations(fake)
    finally:
        fake.unlink()
    assert any("runtime may not import horizontal" in v for v in found)
    assert any("runtime may not import demos" in v for v in found)
