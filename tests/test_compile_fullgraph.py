"""The compiled path (gradstats.traced): ``torch.compile(model, fullgraph=True)`` with the
monitor attached, in both modes, traces with no graph break into one graph per compile, gives
per-example norms equal to per-example autograd in float64, step after step with changing batch
sizes, micro-batch counts and probe steps, and does not recompile after warm-up. Models it does
not cover are refused by name, and a forward whose backward never runs is reported."""
from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from gradstats import GradStatsMonitor

pytest.importorskip("torch._inductor")
from torch._inductor.compile_fx import compile_fx  # noqa: E402
from test_compile import TinyGPT  # noqa: E402


class Attn(TinyGPT):
    """tests/test_compile.py's transformer untied, with an RMSNorm: token and batch-free
    position embeddings, LayerNorm, RMSNorm, SDPA attention, an MLP."""

    def __init__(self, vocab: int, d: int, heads: int):
        super().__init__(vocab, d, T=6, heads=heads)
        self.ln2 = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)


def _mlp(gen: torch.Generator) -> nn.Module:
    d_in, h = (int(torch.randint(3, 9, (), generator=gen)) for _ in range(2))
    return nn.Sequential(nn.Linear(d_in, h), nn.Tanh(), nn.LayerNorm(h), nn.Linear(h, h),
                         nn.ReLU(), nn.Linear(h, 3))


def _norms(gen: torch.Generator) -> nn.Module:
    h = 2 * int(torch.randint(2, 5, (), generator=gen))
    model = nn.Sequential(nn.Linear(5, h), nn.GroupNorm(2, h), nn.Tanh(), nn.Linear(h, h),
                          nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, 3))
    with torch.no_grad():
        model[4].running_mean.uniform_(-1, 1, generator=gen)
        model[4].running_var.uniform_(0.5, 2, generator=gen)
    return model.eval()  # BatchNorm in eval mode: running statistics, per-example exact


class Nano(nn.Module):
    """nanoGPT's batch-free positions ``wpe(arange(T))`` ([T, d]) and an HF-style
    ``[1, T]`` position-ids lookup, each added to the token embeddings."""

    def __init__(self, vocab: int, d: int, T: int):
        super().__init__()
        self.wte, self.wpe, self.wpe2 = (nn.Embedding(vocab, d), nn.Embedding(T, d),
                                         nn.Embedding(T, d))
        self.ln, self.fc, self.head = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, vocab)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        x = self.wpe2(pos[None]) + x
        return self.head(torch.tanh(self.fc(self.ln(x))))


class Problem:
    def __init__(self, name: str, seed: int):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.name, self.gen = name, gen
        if name in ("mlp", "norms"):
            self.model = (_mlp if name == "mlp" else _norms)(gen).double()
            self.d_in = self.model[0].in_features
        elif name == "nano":
            self.vocab, self.T = 19, 4  # the plan's batch sizes include B == T
            self.model = Nano(self.vocab, 6, self.T).double()
        else:
            self.vocab, self.T = 23, int(torch.randint(3, 7, (), generator=gen))
            self.model = Attn(self.vocab, 8, 2).double()
        self.reduction = "mean" if name in ("mlp", "norms") else "sum"

    def batch(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name in ("mlp", "norms"):
            return (torch.randn(B, self.d_in, generator=self.gen, dtype=torch.float64),
                    torch.randint(0, 3, (B,), generator=self.gen))
        return (torch.randint(0, self.vocab, (B, self.T), generator=self.gen),
                torch.randint(0, self.vocab, (B, self.T), generator=self.gen))

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                               reduction=self.reduction)


def _reference(model: nn.Module, prob: Problem, batches) -> torch.Tensor:
    """Per-example squared gradient norms in the units of a mean (or sum) over each example's
    own loss, by one autograd call per example on a copy of the model without the monitor."""
    out = []
    for x, y in batches:
        for i in range(x.shape[0]):
            g = torch.autograd.grad(prob.loss(model(x[i:i + 1]), y[i:i + 1]),
                                    [p for p in model.parameters()])
            out.append(sum(t.square().sum() for t in g))
    return torch.stack(out)


def _compiled(model: nn.Module, inductor: bool = True):
    """``model`` compiled with ``fullgraph=True``, and the list of graphs dynamo hands over
    (inductor, or ``aot_eager``: the same AOT autograd trace and functionalisation of the
    accumulator writes, without inductor's code generation, which costs seconds per graph)."""
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return (compile_fx if inductor else aot_eager)(gm, example_inputs)

    return torch.compile(model, fullgraph=True, backend=backend), graphs


@pytest.mark.parametrize("mode", ["hooks", "fused"])
@pytest.mark.parametrize("name", ["mlp", "attn", "norms", "nano"])
def test_fullgraph_statistics_match_per_example_autograd(name: str, mode: str):
    torch._dynamo.reset()
    seed = torch.seed() % 2**31
    prob = Problem(name, seed)
    model = prob.model
    plain = copy.deepcopy(model)  # a copy of a watched model is a plain model
    mon = GradStatsMonitor(model, mode=mode, loss_reduction=prob.reduction, probe_warmup=1,
                           probe_every=2)
    mon.prepare_compile(prob.batch(3)[0])
    assert all(p.grad is None for p in model.parameters())
    f, graphs = _compiled(model, inductor=name == "mlp" and mode == "fused")
    # micro-batch sizes per step; warm-up: a static batch, then dynamic ones with and without
    # the probe (each a graph); after it, nothing recompiles
    # (a new batch size or micro-batch count forces the probe on the step after it)
    plan = [(4,), (6,), (6,), (6,), (3, 5), (3, 5), (3, 5), (4,), (4,), (2, 2, 4), (2, 2, 4)]
    seen = set()
    for step, sizes in enumerate(plan):
        warm = step > 0 and len(seen) == 2
        torch._dynamo.config.error_on_recompile = warm
        try:
            batches = [prob.batch(B) for B in sizes]
            for x, y in batches:
                (prob.loss(f(x), y) / len(sizes)).backward()
            st = mon.step()
        finally:
            torch._dynamo.config.error_on_recompile = False
        if step > 0:
            seen.add(st.verified)
        assert st.measured, st.skip_reason
        plain.load_state_dict(model.state_dict())
        want = _reference(plain, prob, batches)
        torch.testing.assert_close(st.per_example_sq_norms, want, rtol=1e-9, atol=1e-13)
        assert st.n == sum(sizes)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-0.1)
        model.zero_grad()
    assert seen == {True, False}
    assert len(graphs) == 3  # static batch; dynamic with and without the probe
    mon.detach()


@pytest.mark.parametrize("mode", ["hooks", "fused"])
def test_explain_counts_no_graph_break(mode: str):
    torch._dynamo.reset()
    prob = Problem("attn", 0)
    mon = GradStatsMonitor(prob.model, mode=mode, loss_reduction="sum")
    mon.prepare_compile(prob.batch(2)[0])
    x, _ = prob.batch(3)
    ex = torch._dynamo.explain(prob.model)(x)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
    # that forward's backward never ran: the step says so instead of counting it
    st = mon.step()
    assert not st.measured and "reach every covered layer's backward" in st.skip_reason


class ViewedPositions(nn.Module):
    """Batch-free positions that reach the batch through a view of the layer's output."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(11, 4), nn.Embedding(5, 4)
        self.head = nn.Linear(4, 11)

    def forward(self, idx):
        return self.head(self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))[None])


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(torch.tanh(self.a(x)))


@pytest.mark.parametrize("build,x,why", [
    (ViewedPositions, lambda: torch.randint(0, 11, (3, 5)), "wpe got an input without the batch"),
    (Shared, lambda: torch.randn(3, 4), "a ran 2 times"),
    (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()), lambda: torch.randn(2, 2, 5, 5),
     "has a rule without a traced form"),
])
def test_models_outside_the_compiled_path_are_refused_by_name(build, x, why):
    model = build()
    mon = GradStatsMonitor(model)
    grads = [p.grad for p in model.parameters()]
    with pytest.raises(ValueError, match=why):
        mon.prepare_compile(x())
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    # the eager path still measures it, and compiled forwards keep that path
    inp = x()
    model(inp).float().square().sum().backward()
    st = mon.step()
    assert st.measured and st.per_example_sq_norms.shape[0] == inp.shape[0]
    assert mon.hooks.plan != "ready"


def test_plan_is_learned_by_the_first_compiled_step_without_prepare():
    """torch.compile without fullgraph: the first step runs the eager path (graph breaks), the
    next ones the traced path; the statistics agree with eager throughout."""
    torch._dynamo.reset()
    prob = Problem("mlp", 1)
    eager_prob = Problem("mlp", 1)
    mon = GradStatsMonitor(prob.model)
    ref = GradStatsMonitor(eager_prob.model)
    f = torch.compile(prob.model)
    sig = inspect.signature(prob.model.forward)
    for step in range(3):
        x, y = prob.batch(5 + step)
        eager_prob.batch(5 + step)
        prob.loss(f(x), y).backward()
        prob.loss(eager_prob.model(x), y).backward()
        st, want = mon.step(), ref.step()
        assert mon.hooks.plan == "ready"
        assert int(mon.acc.dev_forwards) == 0  # reset by step()
        torch.testing.assert_close(st.per_example_sq_norms, want.per_example_sq_norms,
                                   rtol=1e-9, atol=0)
        assert math.isclose(st.tr_sigma, want.tr_sigma, rel_tol=1e-9)
        for m in (prob.model, eager_prob.model):
            m.zero_grad()
    # the root's forward, wrapped for the compiled path, keeps its signature; a deepcopy of the
    # watched model runs as a plain model (nothing reaches this monitor's accumulators)
    assert inspect.signature(prob.model.forward) == sig
    twin = copy.deepcopy(prob.model)
    x, y = prob.batch(4)
    prob.loss(torch.compile(twin)(x), y).backward()
    assert int(mon.acc.dev_forwards) == 0 and int(mon.acc.hits.sum()) == 0
    for p in twin.parameters():
        p.grad = None
    mon.detach()
    assert "forward" not in vars(prob.model)


def test_measure_every_leaves_compiled_steps_idle():
    torch._dynamo.reset()
    prob = Problem("mlp", 2)
    mon = GradStatsMonitor(prob.model, measure_every=2)
    mon.prepare_compile(prob.batch(2)[0])
    f = torch.compile(prob.model, fullgraph=True)
    for step in range(4):
        x, y = prob.batch(4)
        prob.loss(f(x), y).backward()
        if step % 2:
            assert int(mon.acc.dev_forwards) == 0 and int(mon.acc.hits.sum()) == 0
        st = mon.step()
        assert st.measured == (step % 2 == 0)
        prob.model.zero_grad()


@pytest.mark.parametrize("mode", ["hooks", "fused"])
def test_hf_bert_compiles_fullgraph_exactly(mode: str):
    """HF BertForSequenceClassification (its own ``labels=`` loss, the ``[1, T]`` position-ids
    and token-type buffers) takes the compiled path: one graph, per-example norms equal to
    per-example autograd."""
    transformers = pytest.importorskip("transformers")
    torch._dynamo.reset()
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(cfg).double()
    plain = copy.deepcopy(model)
    mon = GradStatsMonitor(model, mode=mode)
    gen = torch.Generator().manual_seed(seed)
    mon.prepare_compile(input_ids=torch.randint(0, 64, (3, 8), generator=gen))
    f, graphs = _compiled(model, inductor=False)
    for B in (4, 6):
        ids = torch.randint(0, 64, (B, 8), generator=gen)
        labels = torch.randint(0, 2, (B,), generator=gen)
        f(input_ids=ids, labels=labels).loss.backward()
        st = mon.step()
        want = torch.stack([sum(g.square().sum() for g in torch.autograd.grad(
            plain(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss,
            list(plain.parameters()))) for i in range(B)])
        torch.testing.assert_close(st.per_example_sq_norms, want, rtol=1e-9, atol=1e-14)
        model.zero_grad()
    assert len(graphs) == 2  # the first batch size, then a dynamic one
    mon.detach()


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.ln, self.b, self.c = (nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 8),
                                           nn.Linear(8, 3))

    def block(self, x):
        return torch.tanh(self.b(self.ln(torch.tanh(self.a(x)))))

    def forward(self, x):
        return self.c(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))


@pytest.mark.parametrize("mode", ["hooks", "fused"])
def test_activation_checkpointing_inside_the_graph(mode: str):
    """A non-reentrant checkpointed block in the compiled graph: its recomputation re-runs the
    taps' forwards (no side effects) and each backward writes once: per-example autograd."""
    torch._dynamo.reset()
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Checkpointed().double()
    plain = copy.deepcopy(model)
    mon = GradStatsMonitor(model, mode=mode)
    mon.prepare_compile(torch.randn(3, 5, dtype=torch.float64, generator=gen))
    f, _ = _compiled(model, inductor=False)
    for B in (4, 6, 5):
        x = torch.randn(B, 5, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 3, (B,), generator=gen)
        F.cross_entropy(f(x), y).backward()
        st = mon.step()
        want = torch.stack([sum(g.square().sum() for g in torch.autograd.grad(
            F.cross_entropy(plain(x[i:i + 1]), y[i:i + 1]), list(plain.parameters())))
            for i in range(B)])
        torch.testing.assert_close(st.per_example_sq_norms, want, rtol=1e-9, atol=1e-14)
        model.zero_grad()
    mon.detach()
