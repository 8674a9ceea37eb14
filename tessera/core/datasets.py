"""Small data sets that ship with packages (no download): what demos, tests and benchmarks run on."""

from __future__ import annotations

import importlib

import numpy as np

from tessera.core.errors import ConfigError


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: 1,797 rows, 64 features scaled to [0, 1], 10 classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's Wisconsin breast cancer: 569 rows, 30 standardised features, binary label."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = (d.data - d.data.mean(0)) / d.data.std(0)
    return x.astype(np.float32), d.target.astype(np.int64)


def shifted_digits() -> tuple[np.ndarray, np.ndarray]:
    """Digits and its 8 one-pixel shifts: 16,173 rows, 64 features, 10 classes (enough rows for 1,000 clients)."""
    x, y = digits()
    padded = np.pad(x.reshape(-1, 8, 8), ((0, 0), (1, 1), (1, 1)))
    views = [padded[:, 1 + dy : 9 + dy, 1 + dx : 9 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return np.concatenate(views).reshape(-1, 64).astype(np.float32), np.tile(y, len(views))


BUILTIN = {"digits": digits, "breast_cancer": breast_cancer, "shifted_digits": shifted_digits}


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A built-in data set by name, or `module:function` returning (x, y) numpy arrays."""
    if name in BUILTIN:
        return BUILTIN[name]()
    fn = resolve(name, what="data.dataset", choices=sorted(BUILTIN))
    if not callable(fn):
        raise ConfigError(f"data.dataset: {name!r} is not a function returning (x, y)")
    x, y = fn()
    return np.asarray(x), np.asarray(y)


def resolve(ref: str, *, what: str, choices: list[str]) -> object:
    """Import `module:attr`, with an error naming the key when it is neither a choice nor importable."""
    if ":" not in ref:
        raise ConfigError(f"{what}: unknown value {ref!r}; use one of {choices} or 'module:function'")
    mod, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(mod)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing and missing != mod and not mod.startswith(missing + "."):  # the module imports something absent
            raise ConfigError(f"{what}: module {mod!r} imports {missing!r}, which is not installed") from None
        raise ConfigError(f"{what}: no module {mod!r} (looked in the job's folder and the installed packages); "
                          "check the module path") from None
    if not hasattr(module, attr):
        public = sorted(n for n, v in vars(module).items()
                        if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__)[:8]
        raise ConfigError(f"{what}: module {mod!r} has no {attr!r}; it defines {public}") from None
    return getattr(module, attr)
