"""The built-in text task: a character-level corpus made from the Python standard library's own
source files, and a small nanoGPT-style transformer that models it.

**Corpus.** The files are the top-level modules of the running interpreter's standard library,
``sorted(glob(sysconfig.get_paths()["stdlib"] + "/*.py"))`` (no packages, no tests: 168 files,
4.7 MB for CPython 3.11.7). Each file is read as UTF-8 and mapped to tokens ``0..127``: a code
point below 128 is its own token, any other character becomes token 0 (NUL, which the sources
do not contain otherwise; 28 characters of the pinned corpus map to it). The files are joined in sorted order, each followed by ``"\\n"``. Every tenth
file (sorted index ``i % 10 == 9``) is held out as the validation split, so no window of the
validation text overlaps the training text.

**Pinning.** The standard library differs between Python versions, so the selection is pinned:
:data:`~gradstats.apps.experiments.corpus_manifest.MANIFEST` holds the SHA-256 of every file for
the CPython release it was made from. :func:`load_corpus` checks each file against it and, by
default (``pinned=True``), refuses with a message naming the first mismatch; with
``pinned=False`` it applies the same rule to the files it finds and reports their digest, so a
result says which text it came from.

**Model.** :class:`CharTransformer`: token and position embeddings, ``n_layer`` pre-LayerNorm
blocks (causal self-attention written out with matmuls, so double backward and ``torch.func``
work on every device; a GELU MLP of width ``4d``), a final LayerNorm and an untied output layer.
Initialisation as nanoGPT: ``N(0, 0.02)``, residual projections ``N(0, 0.02/sqrt(2 n_layer))``.
"""
from __future__ import annotations

import glob
import hashlib
import math
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VOCAB",
    "CharTransformer",
    "Corpus",
    "CorpusError",
    "corpus_files",
    "encode",
    "load_corpus",
    "make_char_transformer",
]

VOCAB = 128
HOLDOUT_EVERY = 10


class CorpusError(RuntimeError):
    """The standard library found here is not the pinned one (or is missing files)."""


@dataclass(frozen=True)
class Corpus:
    """Token streams (uint8 ``[n]``) of the training and validation files, and what they are."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    digest: str  # SHA-256 over the sorted (name, file SHA-256) pairs
    pinned: bool  # every file matched the manifest
    python: str

    def describe(self) -> str:
        return (f"Python {self.python} standard library, {len(self.train_files)} training files "
                f"({len(self.train):,} characters) and {len(self.val_files)} validation files "
                f"({len(self.val):,} characters), corpus digest {self.digest[:16]}"
                f"{'' if self.pinned else ' (NOT the pinned selection)'}")


def corpus_files(stdlib: str | None = None) -> list[str]:
    """The selection rule: the standard library's top-level ``*.py`` files, sorted by name."""
    root = stdlib or sysconfig.get_paths()["stdlib"]
    return sorted(glob.glob(os.path.join(root, "*.py")), key=os.path.basename)


def encode(text: str) -> torch.Tensor:
    """Characters to tokens ``0..127`` (code point if below 128, else 0), uint8."""
    raw = text.encode("utf-32-le")
    cps = torch.frombuffer(bytearray(raw), dtype=torch.int32)
    return torch.where(cps < VOCAB, cps, 0).to(torch.uint8)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_corpus(pinned: bool = True, stdlib: str | None = None,
                manifest: dict[str, str] | None = None) -> Corpus:
    """Reads, checks and encodes the corpus (module docstring). ``manifest`` maps file name to
    SHA-256 (default: the pinned one). Raises :class:`CorpusError` when ``pinned`` and any file
    of the manifest is missing, differs, or a file outside it is found."""
    if manifest is None:
        from .experiments.corpus_manifest import MANIFEST as manifest
    files = corpus_files(stdlib)
    names = [os.path.basename(f) for f in files]
    blobs = [Path(f).read_bytes() for f in files]
    digests = {n: _sha256(b) for n, b in zip(names, blobs)}
    problems = [f"{n}: missing" for n in sorted(set(manifest) - set(digests))]
    problems += [f"{n}: not in the pinned selection" for n in sorted(set(digests) - set(manifest))]
    problems += [f"{n}: SHA-256 {digests[n][:12]}... differs from the pinned {manifest[n][:12]}..."
                 for n in names if n in manifest and digests[n] != manifest[n]]
    if problems and pinned:
        where = stdlib or sysconfig.get_paths()["stdlib"]
        raise CorpusError(
            f"the standard library at {where} (Python {sys.version.split()[0]}) is not the "
            f"pinned corpus ({len(problems)} difference(s); first: {problems[0]}). Run with the "
            "CPython release the manifest was made from (gradstats/apps/experiments/"
            "corpus_manifest.py), or pass --corpus any to use this interpreter's files under "
            "the same rule (the result then records their digest instead)")
    if not files:
        raise CorpusError(f"no *.py files found under {stdlib or sysconfig.get_paths()['stdlib']}")
    train, val, tn, vn = [], [], [], []
    for i, (n, b) in enumerate(zip(names, blobs)):
        toks = encode(b.decode("utf-8", errors="replace") + "\n")
        (val if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 else train).append(toks)
        (vn if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 else tn).append(n)
    digest = _sha256("".join(f"{n} {digests[n]}\n" for n in names).encode())
    return Corpus(torch.cat(train), torch.cat(val), tuple(tn), tuple(vn), digest,
                  not problems, sys.version.split()[0])


# ----------------------------------------------------------------------------- the model
class _Block(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_head
        q, k, v = self.qkv(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // h))
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """``[B, T]`` token ids -> ``[B, T, VOCAB]`` next-token logits (module docstring)."""

    def __init__(self, context: int = 64, d: int = 128, n_layer: int = 2, n_head: int = 4,
                 vocab: int = VOCAB) -> None:
        super().__init__()
        if d % n_head:
            raise ValueError(f"d must be a multiple of n_head, got d={d}, n_head={n_head}")
        self.context = context
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_Block(d, n_head) for _ in range(n_layer))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight",
                                                                      "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"input has {t} positions, the model's context is {self.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def make_char_transformer(seed: int = 0, **kwargs: int) -> CharTransformer:
    """A :class:`CharTransformer` initialised from ``seed`` (the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CharTransformer(**kwargs)
