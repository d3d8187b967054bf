"""The suite's models and their (synthetic, seeded) data.

Four cases, the ones the issue "Almost free at default settings" names:

  demo    the demo model: 64-128-128-10 MLP with GELU, B = 32 (a fixed-cost case: per-step
          overheads that do not scale with the model dominate it)
  mlp     MLP 784-512-512-10 with ReLU, B = 128 (T = 1)
  gpt     a small nanoGPT-style language model: vocabulary 1000, learned positions, d = 256,
          4 blocks, 4 heads, MLP 4d, LayerNorm (pre-LN), untied head, T = 128, B = 16; attention
          through ``F.scaled_dot_product_attention(is_causal=True)`` on the split ``c_attn``
          projection, so every parameter sits in an nn.Linear, nn.Embedding or nn.LayerNorm
  cnn     conv 3->32 (3x3) + GroupNorm(8, 32) + ReLU, conv 32->64 (3x3, stride 2) + ReLU,
          conv 64->64 (3x3, stride 2) + ReLU, linear 4096->10, on 32x32x3 inputs, B = 64

Every case's batch loss is the mean of per-example losses (cross-entropy; for the language model
averaged over the example's positions, which with equal T is the mean over all tokens), so each
method can report every example's squared gradient norm in per-example loss units.

``make_cases(tiny=True)`` gives the same architectures at toy sizes (for the harness tests).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelCase", "make_cases", "MLP", "GPT", "CNN", "per_example_loss", "linear_shapes"]


# ============================================================================ architectures
class MLP(nn.Module):
    """``widths[0] -> widths[1] -> ... -> widths[-1]``, the activation between the Linears."""

    def __init__(self, widths: tuple[int, ...], act: type[nn.Module] = nn.ReLU):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(act())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: one Linear to q, k, v, causal SDPA, one output Linear."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), MLP 4d with GELU."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """Token and learned position embeddings, ``layers`` blocks, final LayerNorm, untied head.

    The position ids are a contiguous ``[B, T]`` tensor, so that every tool (Opacus's embedding
    sampler included) sees the batch dimension first."""

    def __init__(self, vocab: int, ctx: int, d: int, layers: int, heads: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device).repeat(B, 1)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class CNN(nn.Module):
    """conv(3->c1) + GroupNorm(8, c1) + ReLU, conv(c1->c2, /2) + ReLU, conv(c2->c2, /2) + ReLU,
    Linear(c2 * (hw/4)^2 -> classes)."""

    def __init__(self, c1: int = 32, c2: int = 64, hw: int = 32, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.norm = nn.GroupNorm(8, c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.fc = nn.Linear(c2 * (hw // 4) ** 2, classes)

    def forward(self, x):
        x = F.relu(self.norm(self.conv1(x)))
        x = F.relu(self.conv3(F.relu(self.conv2(x))))
        return self.fc(x.flatten(1))


# ============================================================================ cases
def per_example_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B]`` cross-entropy per example, averaged over positions for sequence outputs."""
    if logits.dim() == 3:
        B, T, V = logits.shape
        return F.cross_entropy(logits.reshape(B * T, V), y.reshape(B * T),
                               reduction="none").view(B, T).mean(1)
    return F.cross_entropy(logits, y, reduction="none")


@dataclass(frozen=True)
class ModelCase:
    """One benchmarked model: a seeded builder, a seeded batch and what the suite runs on it.

    ``small``: the per-example autograd loop runs on it (it costs B steps of one example).
    ``T``: positions per example of the widest Linear input (1 for the MLPs); the forced Linear
    strategies that apply follow from it (``outer`` needs T = 1 everywhere)."""

    name: str
    desc: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    B: int
    T: int
    small: bool
    vmap_chunk: int
    ref_examples: int

    @property
    def strategies(self) -> tuple[str, ...]:
        """The Linear strategies the suite forces, besides ``auto``."""
        return ("outer", "gram", "direct") if self.T == 1 else ("gram", "direct")

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_example_loss(out, y).mean()

    def instantiate(self, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0):
        """``(model, x, y)`` on ``device``: the same weights and batch in every process."""
        torch.manual_seed(seed)
        model = self.build().to(device=device, dtype=dtype)
        x, y = self.make_batch(torch.Generator().manual_seed(seed))
        x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        return model, x, y.to(device)


def _classification(B: int, shape: tuple[int, ...], classes: int = 10):
    def make(gen: torch.Generator):
        return torch.randn(B, *shape, generator=gen), torch.randint(0, classes, (B,), generator=gen)
    return make


def _tokens(B: int, T: int, vocab: int):
    def make(gen: torch.Generator):
        ids = torch.randint(0, vocab, (B, T + 1), generator=gen)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    return make


#: (full size, tiny size) of each case
_SIZES = {
    "demo": (dict(B=32, widths=(64, 128, 128, 10)), dict(B=8, widths=(16, 32, 32, 10))),
    "mlp": (dict(B=128, widths=(784, 512, 512, 10)), dict(B=8, widths=(32, 24, 24, 10))),
    "gpt": (dict(B=16, T=128, vocab=1000, d=256, layers=4, heads=4),
            dict(B=4, T=8, vocab=50, d=16, layers=1, heads=2)),
    "cnn": (dict(B=64, c1=32, c2=64, hw=32), dict(B=4, c1=8, c2=8, hw=8)),
}


def make_cases(tiny: bool = False) -> dict[str, ModelCase]:
    """The suite's models by name (``tiny``: toy sizes of the same architectures)."""
    s = {k: v[1 if tiny else 0] for k, v in _SIZES.items()}
    demo, mlp, g, c = s["demo"], s["mlp"], s["gpt"], s["cnn"]
    arch = "-".join(map(str, mlp["widths"]))
    return {
        "demo": ModelCase(
            "demo", f"demo MLP {'-'.join(map(str, demo['widths']))} (GELU), B={demo['B']} "
                    "(fixed-cost case)",
            lambda: MLP(demo["widths"], nn.GELU), _classification(demo["B"], (demo["widths"][0],)),
            demo["B"], 1, small=True, vmap_chunk=demo["B"], ref_examples=8),
        "mlp": ModelCase(
            "mlp", f"MLP {arch} (ReLU, T=1), B={mlp['B']}",
            lambda: MLP(mlp["widths"]), _classification(mlp["B"], (mlp["widths"][0],)),
            mlp["B"], 1, small=True, vmap_chunk=32, ref_examples=8),
        "gpt": ModelCase(
            "gpt", f"small GPT: vocab {g['vocab']}, learned positions, d={g['d']}, "
                   f"{g['layers']} layers, {g['heads']} heads, MLP 4d, LayerNorm, untied head, "
                   f"SDPA attention, T={g['T']}, B={g['B']}",
            lambda: GPT(g["vocab"], g["T"], g["d"], g["layers"], g["heads"]),
            _tokens(g["B"], g["T"], g["vocab"]), g["B"], g["T"], small=False, vmap_chunk=4,
            ref_examples=4),
        "cnn": ModelCase(
            "cnn", f"CNN conv3x3(3->{c['c1']})+GroupNorm(8)+ReLU, conv3x3/2(->{c['c2']})+ReLU, "
                   f"conv3x3/2(->{c['c2']})+ReLU, Linear({c['c2'] * (c['hw'] // 4) ** 2}->10) "
                   f"on {c['hw']}x{c['hw']}x3, B={c['B']}",
            lambda: CNN(c["c1"], c["c2"], c["hw"]), _classification(c["B"], (3, c["hw"], c["hw"])),
            c["B"], c["hw"] ** 2, small=True, vmap_chunk=16, ref_examples=8),
    }


def linear_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int, int]]:
    """``(T, d_in, d_out)`` of every Linear and Conv2d of the model, as the per-example norm
    kernels see them (a convolution as a Linear over its output positions), from one forward on
    the first example."""
    shapes: dict[str, tuple[int, int, int]] = {}

    def hook(name):
        def h(mod, inp, out):
            if isinstance(mod, nn.Linear):
                a = inp[0]
                T = a.numel() // (a.shape[0] * a.shape[-1]) if a.dim() > 2 else 1
                shapes[name] = (T, mod.in_features, mod.out_features)
            else:
                k = mod.in_channels // mod.groups
                for s in mod.kernel_size:
                    k *= s
                shapes[name] = (out[0, 0].numel(), k, mod.out_channels // mod.groups)
        return h

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return shapes
