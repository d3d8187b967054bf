"""The training problems the experiments run: what is trained, on which batches, and the loss
the target is measured on.

* ``digits-mlp``: the demo's MLP (:func:`gradstats.apps.models.make_mlp`) on scikit-learn's
  digits; batches from shuffled epochs without replacement, the last partial batch of an epoch
  dropped (exactly :mod:`gradstats.apps.sweep`'s order); target on the cross-entropy of the whole
  training split, evaluated after every step.
* ``digits-cnn``: the same data through a small CNN (:func:`make_digits_cnn`).
* ``text``: the character-level transformer of :mod:`gradstats.apps.text` on the standard
  library corpus; a batch is ``B`` windows of ``context + 1`` characters at uniformly drawn
  offsets of the training split (with replacement: the corpus holds millions of windows); target
  on the mean cross-entropy per character of a fixed set of validation windows, evaluated every
  ``eval_every(B)`` steps so that evaluation costs at most ``eval_overhead`` of training.

Every batch is ``(x, y)`` with the examples along dim 0; :meth:`Task.loss` is the mean over the
examples (for text, each example's loss is the mean over its characters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..common import ConfigError
from ..data import Data, load_digits
from ..models import make_mlp
from ..text import VOCAB, Corpus, load_corpus, make_char_transformer

__all__ = ["TASKS", "Stream", "Task", "TaskConfig", "make_digits_cnn", "make_task"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TaskConfig:
    """A task's model and data settings. ``hidden`` is the MLP width, ``channels`` the CNN's;
    ``context``, ``d``, ``n_layer``, ``n_head`` the transformer's; ``eval_windows`` validation
    windows for the text target; ``corpus``: ``"pinned"`` or ``"any"`` (see
    :func:`gradstats.apps.text.load_corpus`)."""

    name: str
    hidden: int = 128
    channels: int = 8
    context: int = 64
    d: int = 128
    n_layer: int = 2
    n_head: int = 4
    eval_windows: int = 64
    eval_overhead: float = 0.25
    corpus: str = "pinned"
    data_seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.name not in TASKS:
            raise ConfigError("task", f"must be one of {sorted(TASKS)}, got {self.name!r}")
        if self.corpus not in ("pinned", "any"):
            raise ConfigError("corpus", f"must be 'pinned' or 'any', got {self.corpus!r}")
        for k in ("hidden", "channels", "context", "d", "n_layer", "n_head", "eval_windows"):
            if getattr(self, k) < 1:
                raise ConfigError(k, f"must be >= 1, got {getattr(self, k)}")
        if not self.eval_overhead > 0:
            raise ConfigError("eval_overhead", f"must be > 0, got {self.eval_overhead}")


def make_digits_cnn(channels: int = 8, seed: int = 0, classes: int = 10) -> nn.Sequential:
    """``[B, 64]`` digits -> ``[B, 1, 8, 8]`` -> conv 3x3 (``channels``) -> GELU -> conv 3x3
    stride 2 (``2 channels``) -> GELU -> Linear(``2 channels * 16``, classes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)),
                             nn.Conv2d(1, channels, 3, padding=1), nn.GELU(),
                             nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.GELU(),
                             nn.Flatten(), nn.Linear(2 * channels * 16, classes))


class Stream:
    """The batches of one run, drawn from ``seed``; :meth:`next` takes the batch size, so a run
    may change it between steps."""

    def __init__(self, task: Task, seed: int) -> None:
        self.task, self.gen = task, torch.Generator().manual_seed(seed)
        self._perm: torch.Tensor | None = None
        self._pos = 0

    def next(self, batch_size: int) -> Batch:
        t = self.task
        if t.text is None:
            n = len(t.data.y_train)
            if batch_size > n:
                raise ValueError(f"batch_size {batch_size} exceeds the {n} training examples")
            if self._perm is None or self._pos + batch_size > n:
                self._perm, self._pos = torch.randperm(n, generator=self.gen), 0
            idx = self._perm[self._pos:self._pos + batch_size]
            self._pos += batch_size
            return t.data.x_train[idx], t.data.y_train[idx]
        return t.windows(t.text.train, batch_size, self.gen)


class Task:
    """One training problem (module docstring)."""

    def __init__(self, cfg: TaskConfig, data: Data | None = None,
                 corpus: Corpus | None = None) -> None:
        cfg.check()
        self.cfg = cfg
        self.name = cfg.name
        self.data: Data | None = None
        self.text: Corpus | None = None
        if cfg.name.startswith("digits"):
            self.data = data or load_digits(cfg.data_seed)
            self.n_train: int | None = len(self.data.y_train)
            self.tokens_per_example = 1
            self.unit = "examples"
            self._eval = (self.data.x_train, self.data.y_train)
        else:
            self.text = corpus or load_corpus(pinned=cfg.corpus == "pinned")
            self.n_train = None
            self.tokens_per_example = cfg.context
            self.unit = "sequences"
            gen = torch.Generator().manual_seed(10_000 + cfg.data_seed)
            self._eval = self.windows(self.text.val, cfg.eval_windows, gen)

    # ------------------------------------------------------------------ model and loss
    def model(self, seed: int) -> nn.Module:
        c = self.cfg
        if self.name == "digits-mlp":
            return make_mlp(c.hidden, seed, self.data.x_train.shape[1], self.data.n_classes)
        if self.name == "digits-cnn":
            return make_digits_cnn(c.channels, seed, self.data.n_classes)
        return make_char_transformer(seed, context=c.context, d=c.d, n_layer=c.n_layer,
                                     n_head=c.n_head)

    @staticmethod
    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the examples (text: over each example's characters too)."""
        x, y = batch
        out = model(x)
        if out.dim() == 3:
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.cross_entropy(out, y)

    def eval_loss(self, model: nn.Module) -> float:
        """The loss the target is set on (module docstring), without gradients."""
        with torch.no_grad():
            return float(self.loss(model, self._eval))

    def eval_every(self, batch_size: int) -> int:
        """Steps between evaluations: 1 for digits; for text the smallest interval at which an
        evaluation (``eval_windows`` forwards) costs at most ``eval_overhead`` of the training
        steps between (a step of ``B`` examples counted as ``3 B`` forwards)."""
        if self.text is None:
            return 1
        return max(1, math.ceil(self.cfg.eval_windows / (3 * batch_size
                                                          * self.cfg.eval_overhead)))

    # ------------------------------------------------------------------ data
    def stream(self, seed: int) -> Stream:
        return Stream(self, seed)

    def windows(self, src: torch.Tensor, n: int, gen: torch.Generator) -> Batch:
        """``n`` windows at uniform offsets of ``src``: inputs ``[n, T]`` and next characters."""
        t = self.cfg.context
        if len(src) <= t + 1:
            raise ValueError(f"the text split has {len(src)} characters, need > {t + 1}")
        start = torch.randint(0, len(src) - t - 1, (n,), generator=gen)
        w = src[start[:, None] + torch.arange(t + 1)].long()
        return w[:, :-1], w[:, 1:]

    def big_batch(self, n: int, seed: int) -> Batch:
        """A large batch for low-noise measurements: the whole training split for digits,
        ``n`` fresh training windows for text."""
        if self.text is None:
            return self.data.x_train, self.data.y_train
        return self.windows(self.text.train, n, torch.Generator().manual_seed(seed))

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        if self.text is not None:
            n_par = sum(p.numel() for p in self.model(0).parameters())
            return {"task": self.name, "model": f"char transformer: {c.n_layer} layers, d {c.d}, "
                    f"{c.n_head} heads, context {c.context}, vocab {VOCAB} ({n_par:,} parameters)",
                    "data": self.text.describe(), "corpus_digest": self.text.digest,
                    "corpus_pinned": self.text.pinned, "train_files": list(self.text.train_files),
                    "val_files": list(self.text.val_files), "unit": self.unit,
                    "tokens_per_example": self.tokens_per_example,
                    "target_on": f"validation cross-entropy per character, {c.eval_windows} "
                                 "fixed windows"}
        model = (f"MLP 64-{c.hidden}-{c.hidden}-10 (GELU)" if self.name == "digits-mlp" else
                 f"CNN conv{c.channels}-conv{2 * c.channels}s2-linear (GELU)")
        return {"task": self.name, "model": model,
                "data": f"{self.data.name}, {self.n_train} training examples",
                "unit": self.unit, "tokens_per_example": 1,
                "target_on": "training-split cross-entropy, every step"}


TASKS = ("digits-mlp", "digits-cnn", "text")

_CACHE: dict[tuple, Any] = {}


def make_task(cfg: TaskConfig) -> Task:
    """The task, its data loaded once per process (keyed by what the data depend on)."""
    key = ("digits", cfg.data_seed) if cfg.name.startswith("digits") else ("text", cfg.corpus)
    if key not in _CACHE:
        probe = Task(replace(cfg))
        _CACHE[key] = probe.data if probe.text is None else probe.text
    src = _CACHE[key]
    return Task(cfg, data=src if isinstance(src, Data) else None,
                corpus=src if isinstance(src, Corpus) else None)
