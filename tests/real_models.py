"""Small real models from their libraries (random weights from configs, no downloads, every
dropout 0), called the way each library calls them, with an independent per-example reference.

A :class:`Case` holds a builder, a seeded batch of the library call's keyword inputs, the
training loss as the library forms it (HF ``out.loss``; ``cross_entropy`` for the vision models)
and one example's loss for the reference. The reference (:func:`loop_reference`) calls the model
on one example at a time (same attention mask, same padding) and takes autograd of that
example's loss: the sum of its valid tokens' losses for a token-mean loss, its own loss for a
mean over the batch. The monitor's statistics are in these per-example units (``u_i / c``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from monitor_problems import reference_stats
from torch import nn

Batch = dict[str, torch.Tensor]

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
#: Classifier labels are all class 0 and token ids come from the first few ids, so that the
#: examples share a direction and ``|G|^2 > 0`` (``B_simple`` defined) on most draws.
TOKENS = 9


# ============================================================================ nanoGPT
@dataclass
class GPTConfig:
    block_size: int = 16
    vocab_size: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's; PyTorch's has no ``bias=False`` switch in
    older versions)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout, self.resid_dropout = nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropout)
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(cfg.n_embd, cfg.bias), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = LayerNorm(cfg.n_embd, cfg.bias), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's ``GPT``: learned positions ``wpe(arange(T))``, tied ``lm_head``; the loss is
    the token mean of ``cross_entropy(..., ignore_index=-1)`` when ``targets`` are given."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(cfg.vocab_size, cfg.n_embd),
            "wpe": nn.Embedding(cfg.block_size, cfg.n_embd),
            "drop": nn.Dropout(cfg.dropout),
            "h": nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            "ln_f": LayerNorm(cfg.n_embd, cfg.bias),
        })
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        _, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=-1)
        return logits, loss


class LSTMClassifier(nn.Module):
    """Embedding -> one-layer LSTM -> Linear on the last hidden state."""

    def __init__(self, vocab: int = 50, d: int = 16, hidden: int = 24, classes: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.emb(ids))
        return self.head(h[-1])


# ============================================================================ the cases
@dataclass(frozen=True)
class Case:
    """A model, its batch and its losses. ``train_loss(model, batch)`` is the loss the library
    forms; ``example_loss(model, one)`` the reference loss of a one-example batch."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Batch]
    train_loss: Callable[[nn.Module, Batch], torch.Tensor]
    example_loss: Callable[[nn.Module, Batch], torch.Tensor]
    loss_reduction: str = "mean"
    #: the lowest precision the library computes in with a model in ``dtype``: HF's causal-LM
    #: loss upcasts with ``logits.float()``, T5LayerNorm takes its variance in float32
    compute_dtype: torch.dtype = torch.float64
    dtype: torch.dtype = torch.float64
    monitor_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def tol(self) -> float:
        return TOL[self.compute_dtype]


def padded_tokens(g: torch.Generator, B: int, T: int, vocab: int, pad: int = 0) -> Batch:
    """Right-padded sequences of unequal lengths ``T, T-1, ...`` (at least 2): ids (``pad``
    where padded), attention mask, and labels (the ids, -100 where padded)."""
    lengths = torch.tensor([max(2, T - i) for i in range(B)])
    ids = torch.randint(1, min(vocab, TOKENS), (B, T), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _sum_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")


def hf_loss(model: nn.Module, b: Batch) -> torch.Tensor:
    return model(**b).loss


def causal_lm_example(model: nn.Module, b: Batch) -> torch.Tensor:
    """Sum over the example's valid tokens, after the causal LM's shift by one position."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return _sum_ce(logits[:, :-1], b["labels"][:, 1:])


def seq2seq_example(model: nn.Module, b: Batch) -> torch.Tensor:
    return _sum_ce(model(**b).logits, b["labels"])


def classifier_example(model: nn.Module, b: Batch) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return _sum_ce(logits, b["labels"])


def image_loss(model: nn.Module, b: Batch) -> torch.Tensor:
    return F.cross_entropy(model(b["x"]), b["y"])


def image_example(model: nn.Module, b: Batch) -> torch.Tensor:
    return _sum_ce(model(b["x"]), b["y"])


def images(B: int, size: int) -> Callable[[torch.Generator], Batch]:
    def make(g: torch.Generator) -> Batch:
        return {"x": torch.randn(B, 3, size, size, generator=g),
                "y": torch.zeros(B, dtype=torch.long)}
    return make


def tokens(B: int, T: int, vocab: int, pad: int = 0) -> Callable[[torch.Generator], Batch]:
    return lambda g: padded_tokens(g, B, T, vocab, pad)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=1, eos_token_id=1,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    return GPT2LMHeadModel(cfg)


def _llama(tied: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=32, attention_dropout=0.0,
                          tie_word_embeddings=tied)
        return LlamaForCausalLM(cfg)
    return build


def _gemma() -> nn.Module:
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      max_position_embeddings=32, attention_dropout=0.0)
    model = GemmaForCausalLM(cfg)
    with torch.no_grad():  # GemmaRMSNorm scales by (1 + w) with w = 0 at init: make w matter
        for m in model.modules():
            if type(m).__name__ == "GemmaRMSNorm":
                m.weight.normal_(0.0, 0.5)
    return model


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                   num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                   relative_attention_max_distance=16, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg)


def _bert_batch(g: torch.Generator) -> Batch:
    b = padded_tokens(g, 4, 7, 96)
    b["labels"] = torch.zeros(4, dtype=torch.long)
    return b


def _t5_batch(g: torch.Generator) -> Batch:
    enc = padded_tokens(g, 3, 7, 96)
    dec = padded_tokens(g, 3, 5, 96)
    dec["labels"] = dec["labels"].flip(0)  # decoder lengths in another order than the encoder's
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": dec["labels"]}


def _vit() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                             embed_dim=64, num_heads=2, num_classes=5, init_values=0.5)


def _convnext() -> nn.Module:
    import timm

    return timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1),
                             dims=(8, 16, 32, 64),
                             num_classes=5, ls_init_value=0.5)


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=5, norm_layer=lambda c: nn.GroupNorm(8, c))


def _nanogpt_batch(g: torch.Generator) -> Batch:
    idx = torch.randint(0, 64, (4, 4), generator=g)  # T == B
    return {"idx": idx, "targets": torch.randint(0, TOKENS, (4, 4), generator=g)}


def _nanogpt_loss(model: nn.Module, b: Batch) -> torch.Tensor:
    return model(b["idx"], b["targets"])[1]


def _nanogpt_example(model: nn.Module, b: Batch) -> torch.Tensor:
    logits, _ = model(b["idx"], b["targets"])
    return _sum_ce(logits, b["targets"], ignore_index=-1)


def _nanogpt_tokens(args: tuple, kwargs: dict) -> torch.Tensor:
    """nanoGPT's loss counts the targets other than -1 (its ``ignore_index``)."""
    return (args[1] != -1).sum()


F32 = torch.float32
CASES = [
    Case("gpt2", _gpt2, tokens(3, 7, 96), hf_loss, causal_lm_example, "token_mean", F32),
    Case("llama-untied", _llama(False), tokens(3, 7, 96), hf_loss, causal_lm_example,
         "token_mean", F32),
    Case("llama-tied", _llama(True), tokens(3, 7, 96), hf_loss, causal_lm_example,
         "token_mean", F32),
    Case("gemma", _gemma, tokens(3, 7, 96), hf_loss, causal_lm_example, "token_mean", F32),
    Case("gemma-float32", _gemma, tokens(3, 7, 96), hf_loss, causal_lm_example, "token_mean",
         F32, F32),
    Case("bert-cls", _bert, _bert_batch, hf_loss, classifier_example),
    Case("t5", _t5, _t5_batch, hf_loss, seq2seq_example, "token_mean", F32),
    Case("vit", _vit, images(3, 32), image_loss, image_example),
    Case("convnext", _convnext, images(3, 32), image_loss, image_example),
    Case("resnet18-gn", _resnet18, images(3, 32), image_loss, image_example),
    Case("nanogpt", lambda: NanoGPT(GPTConfig()), _nanogpt_batch, _nanogpt_loss,
         _nanogpt_example, "token_mean", monitor_kwargs={"token_counts": _nanogpt_tokens}),
]


def lstm_case() -> Case:
    def batch(g: torch.Generator) -> Batch:
        return {"ids": torch.randint(0, 50, (4, 6), generator=g),
                "y": torch.randint(0, 5, (4,), generator=g)}

    return Case("lstm", LSTMClassifier, batch,
                lambda m, b: F.cross_entropy(m(b["ids"]), b["y"]),
                lambda m, b: _sum_ce(m(b["ids"]), b["y"]))


# ============================================================================ the reference
def one_example(batch: Batch, i: int) -> Batch:
    return {k: v[i:i + 1] for k, v in batch.items()}


def loop_reference(model: nn.Module, case: Case, batch: Batch) -> dict:
    """Float64 statistics from explicit per-example gradients: a loop calling the model on each
    example alone and differentiating that example's loss (see :func:`reference_stats`)."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    rows = []
    for i in range(next(iter(batch.values())).shape[0]):
        loss = case.example_loss(model, one_example(batch, i))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if g is None
                               else g.detach().double().flatten() for p, g in zip(params, grads)]))
    return reference_stats(torch.stack(rows))
