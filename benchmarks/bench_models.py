"""Models a user brings, at a small real size: the monitor at its defaults against the plain step.

    python benchmarks/bench_models.py                        # every model, CPU; prints the tables
    python benchmarks/bench_models.py --quick --models gpt2,vit --threads 1
    python benchmarks/bench_models.py --out benchmarks/results   # also writes models_<device>.*

Models (random weights from configs, every dropout 0, float32), called the way their libraries
call them: HF GPT-2, Llama (untied and tied), Gemma, BERT (sequence classification) and T5 with
keyword inputs and their own ``labels=`` loss (a token mean: ``loss_reduction="token_mean"``);
timm ViT-Tiny and ConvNeXt-Atto, torchvision ResNet-18 with GroupNorm, cross-entropy mean; a
nanoGPT-style model with its own loss. Text: 4 layers, d = 256, T = 128, B = 8, vocabulary
8192; vision: 64 x 64 images, B = 8.

Methods, each on its own copy of the model, in one process, interleaved round by round
(``harness.measure``): ``plain`` (gradients released, forward, the library's loss, backward);
``default`` (the same with ``GradStatsMonitor(model)`` attached at its defaults, contract check
included, and ``monitor.step()``); and, for a model where some call went through the per-call
``torch.func`` rule of the function level, ``fallback`` (``unsupported="fallback"``: the
module-level ``torch.func`` rule), so the two can be compared (target: the per-call route at
least 2x faster). Target for ``default``: at most 1.3x the plain step. For every model over the
target, where the time goes: ``torch.profiler`` by op name against the plain step
(``harness.compare_profiles``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import harness, report

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.3          # default / plain
FALLBACK_GAIN = 2.0   # module-level fallback / per-call route

L, D, HEADS, FF, T, B, VOCAB = 4, 256, 4, 1024, 128, 8, 8192
IMG, CLASSES = 64, 100
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BenchModel:
    name: str
    desc: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    monitor_kwargs: dict[str, Any] = field(default_factory=dict)


# ============================================================================ the models
def _tokens(g: torch.Generator) -> Batch:
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _hf_loss(model: nn.Module, b: Batch) -> torch.Tensor:
    return model(**b).loss


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_positions=T, n_embd=D, n_layer=L, n_head=HEADS, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _llama(tied: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
            num_attention_heads=HEADS, num_key_value_heads=HEADS // 2, max_position_embeddings=T,
            attention_dropout=0.0, tie_word_embeddings=tied))
    return build


def _gemma() -> nn.Module:
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
        num_attention_heads=HEADS, num_key_value_heads=1, head_dim=D // HEADS,
        max_position_embeddings=T, attention_dropout=0.0))


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L, num_attention_heads=HEADS,
        intermediate_size=FF, max_position_embeddings=T, num_labels=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _bert_inputs(g: torch.Generator) -> Batch:
    b = _tokens(g)
    b["labels"] = torch.randint(0, 4, (B,), generator=g)
    return b


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=D, d_kv=D // HEADS, d_ff=FF, num_layers=L,
        num_decoder_layers=L, num_heads=HEADS, dropout_rate=0.0, decoder_start_token_id=0,
        pad_token_id=0))


def _t5_inputs(g: torch.Generator) -> Batch:
    b = _tokens(g)
    b["labels"] = torch.randint(1, VOCAB, (B, T // 2), generator=g)
    return b


def _images(g: torch.Generator) -> Batch:
    return {"x": torch.randn(B, 3, IMG, IMG, generator=g),
            "y": torch.randint(0, CLASSES, (B,), generator=g)}


def _image_loss(model: nn.Module, b: Batch) -> torch.Tensor:
    return F.cross_entropy(model(b["x"]), b["y"])


def _vit() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG,
                             patch_size=8, depth=L, num_classes=CLASSES)


def _convnext() -> nn.Module:
    import timm

    return timm.create_model("convnext_atto", pretrained=False, num_classes=CLASSES)


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=CLASSES,
                                       norm_layer=lambda c: nn.GroupNorm(8, c))


def _nanogpt() -> nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from real_models import GPTConfig, NanoGPT

    return NanoGPT(GPTConfig(block_size=T, vocab_size=VOCAB, n_layer=L, n_head=HEADS, n_embd=D))


def _nanogpt_inputs(g: torch.Generator) -> Batch:
    return {"idx": torch.randint(0, VOCAB, (B, T), generator=g),
            "targets": torch.randint(0, VOCAB, (B, T), generator=g)}


def _nanogpt_loss(model: nn.Module, b: Batch) -> torch.Tensor:
    return model(b["idx"], b["targets"])[1]


def _nanogpt_tokens(args: tuple, kwargs: dict) -> torch.Tensor:
    return (args[1] != -1).sum()


TOKEN_MEAN = {"loss_reduction": "token_mean"}
TEXT = f"{L} layers, d = {D}, T = {T}, B = {B}, vocabulary {VOCAB}"
MODELS = [
    BenchModel("gpt2", f"HF GPT2LMHeadModel (Conv1D, tied), {TEXT}", _gpt2, _tokens, _hf_loss,
               TOKEN_MEAN),
    BenchModel("llama", f"HF LlamaForCausalLM, untied, {TEXT}", _llama(False), _tokens,
               _hf_loss, TOKEN_MEAN),
    BenchModel("llama-tied", f"HF LlamaForCausalLM, tied, {TEXT}", _llama(True), _tokens,
               _hf_loss, TOKEN_MEAN),
    BenchModel("gemma", f"HF GemmaForCausalLM (RMSNorm 1 + w, tied), {TEXT}", _gemma, _tokens,
               _hf_loss, TOKEN_MEAN),
    BenchModel("bert", f"HF BertForSequenceClassification, {TEXT}", _bert, _bert_inputs,
               _hf_loss),
    BenchModel("t5", f"HF T5ForConditionalGeneration, decoder T = {T // 2}, {TEXT}", _t5,
               _t5_inputs, _hf_loss, TOKEN_MEAN),
    BenchModel("vit", f"timm vit_tiny_patch16_224 at {IMG}x{IMG}, patch 8, depth {L}, B = {B}",
               _vit, _images, _image_loss),
    BenchModel("convnext", f"timm convnext_atto at {IMG}x{IMG}, B = {B}", _convnext, _images,
               _image_loss),
    BenchModel("resnet18-gn", f"torchvision resnet18, GroupNorm(8), {IMG}x{IMG}, B = {B}",
               _resnet18, _images, _image_loss),
    BenchModel("nanogpt", f"nanoGPT-style (wpe(arange(T)), tied), {TEXT}", _nanogpt,
               _nanogpt_inputs, _nanogpt_loss,
               {"loss_reduction": "token_mean", "token_counts": _nanogpt_tokens}),
]


# ============================================================================ the methods
def _release(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def plain_step(bm: BenchModel, model: nn.Module, batch: Batch) -> Callable[[], None]:
    def step() -> None:
        _release(model)
        bm.loss(model, batch).backward()
    return step


def monitored_step(bm: BenchModel, model: nn.Module, batch: Batch,
                   **options: Any) -> Callable[[], Any]:
    """``GradStatsMonitor(model, **options)`` and ``monitor.step()`` (timed in ``.inner``)."""
    from torch.profiler import record_function

    import gradstats

    mon = gradstats.GradStatsMonitor(model, **bm.monitor_kwargs, **options)
    watch = harness.Stopwatch(torch.device("cpu"))

    def step() -> Any:
        _release(model)
        bm.loss(model, batch).backward()
        with watch, record_function("gradstats: monitor.step()"):
            return mon.step().b_simple
    step.inner = watch  # type: ignore[attr-defined]
    step.monitor = mon  # type: ignore[attr-defined]
    return step


@contextlib.contextmanager
def per_call_counter() -> Iterator[Counter]:
    """Counts the calls the function level hands to its per-call ``torch.func`` rule, by torch
    function name (empty when this build has no such route)."""
    seen: Counter = Counter()
    try:
        from gradstats.rules.functional import FunctionLevel
        original = FunctionLevel._per_call
    except (ImportError, AttributeError):
        yield seen
        return

    def counted(self, func, *a, **k):
        seen[getattr(func, "__name__", repr(func))] += 1
        return original(self, func, *a, **k)

    FunctionLevel._per_call = counted
    try:
        yield seen
    finally:
        FunctionLevel._per_call = original


# ============================================================================ one model
def measure_model(bm: BenchModel, timing: harness.Timing, args: argparse.Namespace,
                  log: Callable[[str], None] = print) -> dict:
    torch.manual_seed(0)
    base = bm.build().float().train()
    batch = bm.inputs(torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in base.parameters())
    out: dict[str, Any] = {"model": bm.name, "desc": bm.desc, "params": params}
    steps: dict[str, Callable[[], Any]] = {"plain": plain_step(bm, base, batch)}
    failures: dict[str, str] = {}
    with warnings.catch_warnings(record=True) as caught, per_call_counter() as per_call:
        warnings.simplefilter("always")
        made = harness.guard(lambda: monitored_step(bm, copy.deepcopy(base), batch), DEVICE)
        first = made if isinstance(made, str) else harness.guard(made, DEVICE)
    out["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught
                              if "gradstats" in str(w.filename) or "gradstats" in str(w.message)})
    out["per_call"] = dict(per_call)
    if isinstance(first, str):
        failures["default"] = first
    else:
        steps["default"] = made
    if (per_call or args.fallback == "all") and "default" in steps:
        fb = harness.guard(lambda: monitored_step(bm, copy.deepcopy(base), batch,
                                                  unsupported="fallback"), DEVICE)
        if isinstance(fb, str):
            failures["fallback"] = fb
        else:
            steps["fallback"] = fb
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples, late, _ = harness.measure(steps, DEVICE, timing)
    failures.update(late)
    rows = {}
    for key, s in samples.items():
        inner = getattr(steps[key], "inner", None)
        rows[key] = {"time_s": s.median, "spread": s.spread, "rounds": len(s.times),
                     "samples_s": s.times, "other_load": s.other_load,
                     "step_s": inner.median if inner is not None else None}
        if key != "plain" and "plain" in samples:
            rows[key]["ratio_to_plain"] = report.paired(s.times, samples["plain"].times)
    if "fallback" in samples and "default" in samples:
        out["fallback_vs_default"] = report.paired(samples["fallback"].times,
                                                   samples["default"].times)
    out["rows"], out["failures"] = rows, failures
    ratio = rows.get("default", {}).get("ratio_to_plain", {}).get("ratio")
    log(f"  {bm.name:12s} plain {fmt(rows.get('plain'))}  default {fmt(rows.get('default'))}"
        + (f" x{ratio:.2f}" if ratio else "") + (f"  {failures}" if failures else "")
        + (f"  per-call torch.func: {dict(per_call)}" if per_call else ""))
    over = ratio is not None and ratio > TARGET
    if "default" in samples and (over or args.profile == "all") and args.profile != "none":
        steps["default"].inner.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = harness.guard(lambda: harness.compare_profiles(
                steps["plain"], steps["default"], DEVICE, args.profile_steps,
                prefix="gradstats", top=args.top), DEVICE)
        out["attribution"] = a
    for st in steps.values():
        mon = getattr(st, "monitor", None)
        if mon is not None:
            mon.detach()
    return out


def fmt(row: dict | None) -> str:
    return "n/a" if row is None else f"{row['time_s'] * 1e3:.1f} ms"


# ============================================================================ the report
def markdown(result: dict) -> str:
    rows = []
    for c in result["cases"]:
        r, fails = c["rows"], c["failures"]
        d = r.get("default", {})
        ratio = d.get("ratio_to_plain")
        fb = r.get("fallback", {}).get("ratio_to_plain")
        gain = c.get("fallback_vs_default")
        verdict = ("" if ratio is None else
                   "met" if ratio["ratio"] <= TARGET else f"over ({ratio['ratio']:.2f}x)")
        rows.append([
            c["model"], f"{c['params'] / 1e6:.1f}", report.fmt_ms(r.get("plain", {}).get("time_s")),
            report.fmt_ms(d["time_s"]) if d else report.cell(fails.get("default", "")),
            f"{ratio['ratio']:.2f}x ({ratio['spread']:.0%})" if ratio else "",
            report.fmt_ms(d.get("step_s")), verdict,
            report.cell(", ".join(f"{k} x{v}" for k, v in c["per_call"].items()) or "none"),
            f"{fb['ratio']:.2f}x" if fb else report.cell(fails.get("fallback", "")),
            f"{gain['ratio']:.2f}x" if gain else ""])
    head = ["model", "params (M)", "plain (ms)", "default (ms)", "default / plain", "step() (ms)",
            f"target <= {TARGET}x", "per-call torch.func calls / step",
            "fallback / plain", "fallback / default"]
    L = report.header("Real models: the monitor at its defaults against the plain step",
                      result["meta"])
    L += [("Each method runs a training step (gradients released, forward, the library's loss, "
           "backward; `monitor.step()` for the monitored ones) on its own copy of the model, "
           "interleaved round by round in one process; times are medians of the rounds, "
           "`/ plain` the median of the round-by-round ratios ((x%) = their IQR/median). "
           "default = `GradStatsMonitor(model)` (contract check on; "
           "`loss_reduction=\"token_mean\"` for the labels= losses); fallback = "
           "`unsupported=\"fallback\"` (the module-level torch.func rule), timed where the "
           f"per-call route ran. Targets: default <= {TARGET}x plain; the per-call route >= "
           f"{FALLBACK_GAIN:.0f}x faster than the module-level fallback (fallback / default "
           f">= {FALLBACK_GAIN:.0f})."), ""]
    L += report.table(head, rows, right={1, 2, 3, 4, 5, 8, 9})
    L += [f"- **{c['model']}**: {c['desc']}" for c in result["cases"]] + [""]
    notes = [f"- {c['model']}: {w}" for c in result["cases"] for w in c.get("warnings", [])]
    if notes:
        L += ["Warnings from gradstats:", ""] + notes + [""]
    att = [c for c in result["cases"] if isinstance(c.get("attribution"), dict)]
    if att:
        L += ["## Where the time goes", "",
              ("A few steps under `torch.profiler`, plain and default in turn, events aggregated "
               "by name: the gradstats ops (time including what they call), then the ops whose "
               "self time grew most against the plain step."), ""]
        for c in att:
            a = c["attribution"]
            L += [(f"**{c['model']}**: under the profiler plain {a['base_ms']:.1f} ms, default "
                   f"{a['fn_ms']:.1f} ms per step."), ""] + report.profile_tables(a)
    return "\n".join(L)


# ============================================================================ main
DEVICE = torch.device("cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=None, metavar="M1,M2",
                   help=f"subset of: {', '.join(m.name for m in MODELS)}")
    p.add_argument("--quick", action="store_true", help="few rounds, short budgets")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--fallback", choices=("per-call", "all"), default="per-call",
                   help="time unsupported='fallback' where the per-call route ran, or always")
    p.add_argument("--profile", choices=("over", "all", "none"), default="over",
                   help="attribute the time of the models over the target, of all, or none")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--top", type=int, default=10, help="ops listed per profile")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for models_<device>.json and .md (default: print only)")
    args = p.parse_args(argv)
    known = {m.name for m in MODELS}
    if args.models:
        bad = sorted(set(args.models.split(",")) - known)
        if bad:
            p.error(f"--models: unknown {bad}; choose from {sorted(known)}")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.profile_steps < 1:
        p.error("--profile-steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    timing = harness.Timing.quick() if args.quick else harness.Timing()
    chosen = [m for m in MODELS if not args.models or m.name in args.models.split(",")]
    meta = report.environment(DEVICE, quick=args.quick, target=TARGET,
                              timing=timing.__dict__)
    t0 = time.perf_counter()
    cases = []
    for bm in chosen:
        print(f"{bm.name}: {bm.desc}", flush=True)
        cases.append(measure_model(bm, timing, args))
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    result = {"meta": meta, "cases": cases}
    text = markdown(result)
    print(text)
    if args.out is not None:
        j, m = report.save(args.out, f"models_{harness.device_tag(DEVICE)}", result, text)
        print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
