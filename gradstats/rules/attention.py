"""nn.MultiheadAttention. It uses its projection weights functionally (hooks on ``out_proj`` never
fire), so the rule runs the module's forward through its own composition of the same maths, with
the four projections as watched ``F.linear`` calls: per example, the packed ``in_proj_weight``
norm is the sum of the q, k and v blocks' Linear norms (disjoint rows), ``out_proj`` is a Linear
on the attention output. A module called twice per forward gets its cross terms block by block.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import Rule, Sink
from .linear import linear_collect, linear_factors
from .registry import register_rule

#: ``watch(y, saved, part, collect, factors)``: the monitor's hook on a projection output ``y``
Watch = Callable[..., None]


def _rows(p: torch.Tensor | None, i: int, E: int) -> torch.Tensor | None:
    return None if p is None else p[i * E:(i + 1) * E]


class _Block(Sink):
    """A sink restricted to rows ``[off, off + E)`` of the packed q/k/v parameters."""

    __slots__ = ()

    @classmethod
    def of(cls, sink: Sink, names: dict[str, str], offsets: dict[str, int], E: int) -> Sink:
        vectors = None
        if sink.vectors is not None:
            vectors = {}
            for local, name in names.items():
                if name in sink.slots:
                    v = sink.vectors[name]
                    o = offsets[local]
                    vectors[local] = (v[0][o:o + E], *v[1:])
        slots = {local: sink.slots[name] for local, name in names.items() if name in sink.slots}
        return cls(sink.E, sink.P, sink.rows, slots, vectors, sink.strategy, sink.forward)


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(Rule):
    replaces_forward = True
    claims_children = True

    def check(self, module: nn.MultiheadAttention, name: str) -> None:
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(f"{name} (MultiheadAttention): add_bias_kv and add_zero_attn are "
                             "not supported by gradstats")

    def params(self, module):
        return dict(module.named_parameters())

    def _projections(self, m: nn.MultiheadAttention):
        """Per projection: (part, weight, bias, {local: param name}, {local: row offset})."""
        E = m.embed_dim
        out = []
        for i, s in enumerate("qkv"):
            if m._qkv_same_embed_dim:
                w, wname, woff = _rows(m.in_proj_weight, i, E), "in_proj_weight", i * E
            else:
                w, wname, woff = getattr(m, f"{s}_proj_weight"), f"{s}_proj_weight", 0
            out.append((s, w, _rows(m.in_proj_bias, i, E), {"weight": wname, "bias": "in_proj_bias"},
                        {"weight": woff, "bias": i * E}))
        out.append(("out", m.out_proj.weight, m.out_proj.bias,
                    {"weight": "out_proj.weight", "bias": "out_proj.bias"}, {"weight": 0, "bias": 0}))
        return out

    def forward(self, m: nn.MultiheadAttention, watch: Watch | None, query, key, value,
                key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if watch is None:
            return type(m).forward(m, query, key, value, key_padding_mask, need_weights,
                                   attn_mask, average_attn_weights, is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use "
                               "the Transformer module method `generate_square_subsequent_mask` "
                               "to create this mask.")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (x.unsqueeze(1 if not m.batch_first else 0)
                                 for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not m.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        B, L, E = query.shape
        S, H = key.shape[1], m.num_heads
        hd = E // H
        E_p = m.embed_dim
        projections = self._projections(m)

        def project(x, part, w, b, names, offsets):
            y = F.linear(x, w, b)
            if y.requires_grad:
                saved = x.detach()
                has_bias = b is not None and b.requires_grad

                def collect(saved, g, sink):
                    linear_collect(saved, g, _Block.of(sink, names, offsets, E_p))

                def factors(saved, g):
                    f = linear_factors(saved, g, w.requires_grad, has_bias)
                    return {names[k]: v for k, v in f.items()}

                watch(y, saved, part, collect, factors)
            return y

        q, k, v = (project(x, *p) for x, p in zip((query, key, value), projections[:3]))
        q, k, v = (t.reshape(B, t.shape[1], H, hd).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        mask = _merged_mask(attn_mask, key_padding_mask, B, H, L, S, scores.dtype)
        if mask is not None:
            scores = scores + mask
        attn = scores.softmax(-1)
        if m.training and m.dropout > 0:
            attn = F.dropout(attn, p=m.dropout)
        o = (attn @ v).transpose(1, 2).reshape(B, L, E)
        out = project(o, *projections[3])
        if not m.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(1) if average_attn_weights else attn
        if unbatched:
            out = out.squeeze(1 if not m.batch_first else 0)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def collect(self, module, saved, grad_output, sink):
        raise RuntimeError("MultiheadAttention is measured through its own forward")


def _merged_mask(attn_mask, key_padding_mask, B, H, L, S, dtype):
    """The additive [B, H, L, S] mask F.multi_head_attention_forward applies (-inf where a
    boolean mask is True)."""

    def additive(mask):
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                mask, float("-inf"))
        return mask.to(dtype)

    out = None
    if attn_mask is not None:
        am = additive(attn_mask)
        am = am.view(B, H, L, S) if am.dim() == 3 else am.view(1, 1, L, S)
        out = am
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).view(B, 1, 1, S)
        out = kp if out is None else out + kp
    return out


__all__ = ["MultiheadAttentionRule"]
