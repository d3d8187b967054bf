"""nn.MultiheadAttention. It uses its projection weights functionally (hooks on ``out_proj`` never
fire), so the rule runs the module's forward through its own composition of the same maths, with
the four projections as hooked ``F.linear`` calls: per example, the packed ``in_proj_weight``
norm is the sum of the q, k and v blocks' Linear norms (disjoint rows), ``out_proj`` is a Linear
on the attention output."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import _ops
from . import register_rule
from .base import Rule, factored_probe, summed_probe


def _rows(p: torch.Tensor | None, i: int, E: int) -> torch.Tensor | None:
    return None if p is None else p[i * E:(i + 1) * E]


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

    def _weights(self, m: nn.MultiheadAttention):
        """(param name, weight, bias name, bias, row offset) of the q, k, v projections."""
        E = m.embed_dim
        out = []
        for i, s in enumerate("qkv"):
            if m._qkv_same_embed_dim:
                wname, w, off = "in_proj_weight", _rows(m.in_proj_weight, i, E), i * E
            else:
                wname, w, off = f"{s}_proj_weight", getattr(m, f"{s}_proj_weight"), 0
            out.append((wname, w, "in_proj_bias", _rows(m.in_proj_bias, i, E), off, i * E))
        return out

    def fused_forward(self, module: nn.MultiheadAttention, begin) -> Any:
        m = module

        def forward(query, key, value, key_padding_mask=None, need_weights=True,
                    attn_mask=None, average_attn_weights=True, is_causal=False):
            needs = any(p.requires_grad for p in m.parameters())
            report = begin(m, needs and torch.is_grad_enabled())
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

            def project(x, sub, w, b, wname, off, boff):
                y = F.linear(x, w, b)
                if report is not None and y.requires_grad:
                    saved = x.detach()
                    y.register_hook(lambda g: self._report(report, m, sub, saved, g, wname, off,
                                                           b is not None, boff))
                return y

            qkv = [project(x, s, w, b, wn, off, boff) for x, (s, (wn, w, _, b, off, boff)) in
                   zip((query, key, value), zip("qkv", self._weights(m)))]
            q, k, v = (t.reshape(B, -1, H, hd).transpose(1, 2) for t in qkv)
            scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
            mask = _merged_mask(attn_mask, key_padding_mask, B, H, L, S, scores.dtype)
            if mask is not None:
                scores = scores + mask
            attn = scores.softmax(-1)
            if m.training and m.dropout > 0:
                attn = F.dropout(attn, p=m.dropout)
            o = (attn @ v).transpose(1, 2).reshape(B, L, E)
            out = project(o, "out", m.out_proj.weight, m.out_proj.bias, "out_proj.weight", 0, 0)
            if not m.batch_first:
                out = out.transpose(0, 1)
            weights = None
            if need_weights:
                weights = attn.mean(1) if average_attn_weights else attn
            if unbatched:
                out = out.squeeze(1 if not m.batch_first else 0)
                weights = None if weights is None else weights.squeeze(0)
            return out, weights

        return forward

    def _report(self, report, m, sub, saved, g, wname, off, has_bias, boff) -> None:
        bname = "out_proj.bias" if sub == "out" else "in_proj_bias"
        w, b = _ops.linear_norms(saved, g)
        norms = {wname: w}
        if has_bias:
            norms[bname] = b
        report(saved, g, norms, probes=lambda vectors: self._probe(
            vectors, saved, g, wname, off, bname if has_bias else None, boff), sub=sub)

    def _probe(self, vectors, saved, g, wname, off, bname, boff):
        G = g.reshape(-1, g.shape[-1])
        A = saved.reshape(-1, saved.shape[-1])
        out = {}
        if wname in vectors:
            x, y = vectors[wname]
            out[wname] = factored_probe(G, A, x[off:off + G.shape[1]], y)
        if bname is not None and bname in vectors:
            out[bname] = summed_probe(G, vectors[bname][0][boff:boff + G.shape[1]])
        return out

    def norms(self, module, saved, grad_output):
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
