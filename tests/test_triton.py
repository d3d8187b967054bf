"""The Triton kernels (gradstats.kernels) against the float64 reference and per-example autograd.

Without a GPU the kernels run under Triton's interpreter on CPU tensors. No environment variable
is involved, so this module can be collected with any other, in any order, and leaks nothing:
``gradstats.kernels`` keeps an interpreted build of each kernel beside the compiled one and picks
by the tensors' device at each launch (``gradstats/kernels/_launch.py`` says why
``TRITON_INTERPRET=1`` cannot be relied on inside a test suite: Triton reads it when a function
is decorated, and its standard library is decorated when triton is first imported). On a GPU the
same tests run the compiled kernels on CUDA tensors, float32 with ``input_precision="ieee"``.

What the interpreter (triton 3.8) gets right and wrong: ``tl.dot`` and ``tl.atomic_add`` on
float32 and float16 operands are right; ``tl.dot`` on bfloat16 operands is wrong, while the same
values cast to float32 after the load are right. So bfloat16 runs through the upcast-after-load
switch (``upcast=True``: the kernels' ``CAST`` constexpr "fp32") on the CPU, float16 on the dot
path, and the bfloat16 tensor-core path is checked on a GPU only (``test_half_dot_path_cuda``).
"""
from __future__ import annotations

import os
import importlib
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton", reason="gradstats.kernels needs triton")

import gradstats  # noqa: E402
from gradstats import kernels, reference  # noqa: E402
from gradstats.kernels import Config, cost, fused_linear, gram_norms  # noqa: E402

from conftest import devices, requires_cuda  # noqa: E402

HALF = (torch.float16, torch.bfloat16)
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
OP = torch.ops.gradstats.triton_linear_fused_collect.default


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    mid: tuple[int, ...]
    d_in: int
    d_out: int
    config: Config | None = None  # None: the default for the device
    programs: int | None = None
    strided: bool = False  # A a strided view, G stored [B, d_out, T] and transposed

    def __str__(self) -> str:
        return self.name


SHAPES = [
    # T = 37 against 16-wide T blocks; one tile split over 3 programs (partials + second pass)
    Shape("odd-T", 3, (37,), 40, 24),
    # 6 tiles dealt whole to 3 programs (round-robin phase only); strided inputs
    Shape("tiles-strided", 5, (9,), 70, 33, Config(32, 32, 16, 1, 1), 3, strided=True),
    Shape("B1-small-d", 1, (20,), 5, 3),
    # 6 tiles on 4 programs: one round of whole tiles, then 2 tiles x 7 examples split
    Shape("T1-both-phases", 7, (), 33, 17, Config(16, 16, 16, 1, 1), 4),
    Shape("4d", 2, (3, 5), 24, 40),
]
DTYPE_SHAPES = {torch.float32: SHAPES, torch.float16: SHAPES[:2], torch.bfloat16: SHAPES[:2]}
CASES = [pytest.param(dt, s, id=f"{str(dt)[6:]}-{s}")
         for dt, ss in DTYPE_SHAPES.items() for s in ss]


def _inputs(s: Shape, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    T = 1
    for m in s.mid:
        T *= m
    if s.strided:  # [B, T, d] views: A every other column, G stored [B, d_out, T]
        assert len(s.mid) == 1
        A = torch.randn(s.B, T, 2 * s.d_in, generator=gen).to(device, dtype)[..., ::2]
        G = torch.randn(s.B, s.d_out, T, generator=gen).to(device, dtype).transpose(1, 2)
        assert not A.is_contiguous() and not G.is_contiguous()
        return A, G
    return (torch.randn(s.B, *s.mid, s.d_in, generator=gen).to(device, dtype),
            torch.randn(s.B, *s.mid, s.d_out, generator=gen).to(device, dtype))


def _flat64(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B = A.shape[0]
    return (A.double().cpu().reshape(B, -1, A.shape[-1]),
            G.double().cpu().reshape(B, -1, G.shape[-1]))


def _scales(A: torch.Tensor, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """The magnitudes of the summed terms, which set the rounding where the terms cancel:
    ``|G|^T |A|`` for dW, ``sum_t |g_t|`` for db, ``sum_{t,s} |a_t.a_s||g_t.g_s|`` for the
    weight norms and ``sum_{t,s} |g_t.g_s|`` for the bias norms."""
    a, g = _flat64(A, G)
    ka, kg = (a @ a.transpose(1, 2)).abs(), (g @ g.transpose(1, 2)).abs()
    dw_i = g.abs().transpose(1, 2) @ a.abs()  # [B, d_out, d_in]: |g_i|^T |a_i|
    db_i = g.abs().sum(1)
    return {"dW": dw_i.sum(0), "db": db_i.sum(0), "w": (ka * kg).sum((1, 2)),
            "b": kg.sum((1, 2)), "sq": dw_i.square().sum(0), "bsq": db_i.square().sum(0)}


def _close(x: torch.Tensor, ref: torch.Tensor, rtol: float, scale: torch.Tensor) -> None:
    x, ref = x.double().cpu(), ref.double().cpu()
    err = ((x - ref).abs() / torch.maximum(ref.abs(), scale).clamp_min(1e-300)).max().item()
    assert err <= rtol, err


def _options(device: str, dtype: torch.dtype) -> dict:
    """bf16 through the upcast switch under the interpreter; fp32 'ieee' everywhere."""
    return dict(precision="ieee", upcast=(device == "cpu" and dtype == torch.bfloat16) or None)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype,shape", CASES)
def test_fused_matches_float64_reference(dtype, shape, device):
    A, G = _inputs(shape, dtype, device)
    r = fused_linear(A, G, sumsq=True, out_dtype=torch.float32, programs=shape.programs,
                     config=shape.config, **_options(device, dtype))
    dw_i, db_i = reference.linear_per_example_grads(A, G)
    sc, tol = _scales(A, G), RTOL[dtype]
    assert r.dW.dtype == torch.float32 and r.weight_norms.dtype == torch.float32
    _close(r.dW, dw_i.sum(0), tol, sc["dW"])
    _close(r.db, db_i.sum(0), tol, sc["db"])
    _close(r.weight_norms, dw_i.square().sum((1, 2)), tol, sc["w"])
    _close(r.bias_norms, db_i.square().sum(1), tol, sc["b"])
    # sum_i (dW_i)^2 per coordinate: each dW_i is itself a sum that may cancel (B = 1 shows
    # it), so the scale is sum_i (|g_i|^T |a_i|)^2 and the bound twice the sum's
    _close(r.sumsq, dw_i.square().sum(0), 2 * tol, sc["sq"])
    _close(r.bias_sumsq, db_i.square().sum(0), 2 * tol, sc["bsq"])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_output_dtype_is_the_float32_result_rounded(dtype, device):
    """By default dW comes back in the inputs' dtype: the float32 accumulator rounded once, to
    nearest (the interpreter's float32 -> bfloat16 cast truncates instead: its bits are the
    float32 bits with the low 16 cleared)."""
    s = SHAPES[0]
    A, G = _inputs(s, dtype, device)
    opts = _options(device, dtype)
    r16 = fused_linear(A, G, **opts)
    r32 = fused_linear(A, G, out_dtype=torch.float32, **opts)
    assert r16.dW.dtype == dtype and r16.db.dtype == dtype
    if device == "cpu" and dtype == torch.bfloat16:
        truncated = (r32.dW.view(torch.int32) & ~0xFFFF).view(torch.float32)
        assert torch.equal(r16.dW.float(), truncated)
    else:
        assert torch.equal(r16.dW, r32.dW.to(dtype))
    assert torch.equal(r16.weight_norms, r32.weight_norms)


@pytest.mark.parametrize("device", devices())
def test_deterministic_variant(device):
    """No atomics: per-(example, tile) squares to a workspace, summed in a fixed order. Same
    values as the atomic variant within rounding, and bitwise the same from run to run."""
    # 4 tiles on 3 programs: one round of whole tiles, then 1 tile x 3 examples split in 3
    s = Shape("det", 3, (5,), 40, 24, Config(16, 32, 16, 1, 1), 3)
    A, G = _inputs(s, torch.float32, device)
    kw = dict(config=s.config, programs=s.programs, precision="ieee")
    d1 = fused_linear(A, G, deterministic=True, sumsq=True, **kw)
    at = fused_linear(A, G, sumsq=True, **kw)
    if device == "cuda":  # the interpreter runs programs one after the other anyway
        d2 = fused_linear(A, G, deterministic=True, sumsq=True, **kw)
        for x, y in ((d1.weight_norms, d2.weight_norms), (d1.dW, d2.dW), (d1.sumsq, d2.sumsq)):
            assert torch.equal(x, y)
    torch.testing.assert_close(d1.weight_norms, at.weight_norms, rtol=1e-5, atol=0)
    assert torch.equal(d1.dW, at.dW)  # dW never uses atomics: partials are added in order


def _check_both_routes(A: torch.Tensor, G: torch.Tensor, rtol: float, a_ref: torch.Tensor,
                       **opts) -> None:
    """fused_linear's dW and weight norms, and gram_norms, against the float64 per-example
    gradients of ``(a_ref, G)``."""
    dw_i = reference.linear_per_example_grads(a_ref, G)[0]
    sc = _scales(a_ref, G)
    r = fused_linear(A, G, out_dtype=torch.float32, **opts)
    _close(r.dW, dw_i.sum(0), rtol, sc["dW"])
    _close(r.weight_norms, dw_i.square().sum((1, 2)), rtol, sc["w"])
    _close(gram_norms(A, G, **opts), dw_i.square().sum((1, 2)), rtol, sc["w"])


@pytest.mark.parametrize("device", devices())
def test_mixed_dtypes_meet_in_the_half_dtype(device):
    """float32 A with a half G (autocast saves a Linear's float32 input): A is rounded to G's
    dtype after the load, the operands autograd's own dW GEMM uses under autocast; with
    ``upcast=True`` both are float32. float16 on the CPU (the interpreter's float16 dot is
    right), bfloat16 too on a GPU."""
    s = SHAPES[0]
    A, G32 = _inputs(s, torch.float32, device)
    for half in (torch.float16,) + ((torch.bfloat16,) if device == "cuda" else ()):
        G = G32.to(half)
        for upcast, a_ref in ((None, A.to(half)), (True, A)):
            _check_both_routes(A, G, 1e-5, a_ref, upcast=upcast)
        assert fused_linear(A, G).dW.dtype == torch.float32  # promoted, as autograd's


GRAM_SHAPES = [Shape("odd-T", 3, (37,), 40, 24), Shape("T70", 2, (70,), 20, 33),
               Shape("B1-T5", 1, (5,), 5, 3)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=str)
def test_gram_matches_float64_reference(shape, dtype, device):
    A, G = _inputs(shape, dtype, device)
    opts = _options(device, dtype)
    ref = reference.linear_norms(A, G)[0]
    scale = _scales(A, G)["w"]
    _close(gram_norms(A, G, **opts), ref, RTOL[dtype], scale)
    _close(gram_norms(A, G, deterministic=True, **opts), ref, RTOL[dtype], scale)


def test_gram_never_forms_txt_in_memory():
    """T = 200 with 32-wide T blocks: 7 x 7 block pairs, each a register tile; the deterministic
    workspace holds one float per block pair, not T x T."""
    A, G = torch.randn(1, 200, 8), torch.randn(1, 200, 8)
    ref = reference.linear_norms(A, G)[0]
    _close(gram_norms(A, G, block_t=32, block_d=16), ref, 1e-5, _scales(A, G)["w"])


# ------------------------------------------------------------------------- the custom op
def _accumulators(B: int, d_in: int, d_out: int, device: str, K: int = 2, S: int = 3):
    """E [S, N] and P [S, 2K] with random contents (the op adds into them), rows a random
    permutation into N = B + 3 columns, probe vectors as the monitor draws them."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    f64 = dict(dtype=torch.float64)
    E = torch.randn(S, B + 3, generator=gen, **f64).to(device)
    P = torch.randn(S, 2 * K, generator=gen, **f64).to(device)
    rows = torch.randperm(B + 3, generator=gen)[:B].to(device)
    xw, yw, vb = (torch.randn(n, K, generator=gen, **f64).to(device) for n in (d_out, d_in, d_out))
    return E, P, rows, xw, yw, vb


def _expected(A, G, E, P, rows, slot_w, slot_b, xw, yw, vb):
    """What the op must leave in E and P, from float64 per-example gradients."""
    dw_i, db_i = reference.linear_per_example_grads(A, G)
    a, g = _flat64(A, G)
    a, g = a.flatten(0, 1), g.flatten(0, 1)
    E, P = E.double().cpu().clone(), P.double().cpu().clone()
    rows = rows.cpu()
    K = P.shape[1] // 2
    xw, yw, vb = xw.cpu(), yw.cpu(), vb.cpu()
    E[slot_w, rows] += dw_i.square().sum((1, 2))
    E[slot_b, rows] += db_i.square().sum(1)
    dW, db = dw_i.sum(0), db_i.sum(0)
    P[slot_w, :K] += ((dW @ yw) * xw).sum(0)
    P[slot_w, K:] += (g.norm(dim=1) * a.norm(dim=1)).sum() * xw.norm(dim=0) * yw.norm(dim=0)
    P[slot_b, :K] += vb.t() @ db
    P[slot_b, K:] += g.norm(dim=1).sum() * vb.norm(dim=0)
    return dW, db, E, P


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("strategy", ["direct", "gram", "auto", "outer"])
def test_op_writes_the_accumulators(strategy, device):
    s = Shape("T1", 6, (), 20, 12) if strategy == "outer" else Shape("T13", 4, (13,), 20, 12)
    A, G = _inputs(s, torch.float32, device)
    E, P, rows, xw, yw, vb = _accumulators(s.B, s.d_in, s.d_out, device)
    dW_ref, db_ref, E_ref, P_ref = _expected(A, G, E, P, rows, 2, 0, xw, yw, vb)
    dW, db = OP(A, G, E, P, rows, 2, 0, xw, yw, vb, strategy)
    sc = _scales(A, G)
    _close(dW, dW_ref, 1e-5, sc["dW"])
    _close(db, db_ref, 1e-5, sc["db"])
    _close(E[2, rows], E_ref[2, rows.cpu()], 1e-5, sc["w"] + E_ref[2, rows.cpu()].abs())
    _close(E[0, rows], E_ref[0, rows.cpu()], 1e-5, sc["b"] + E_ref[0, rows.cpu()].abs())
    untouched = torch.ones(E.shape, dtype=torch.bool)
    untouched[2, rows.cpu()] = untouched[0, rows.cpu()] = False
    assert torch.equal(E.cpu()[untouched], E_ref[untouched])
    assert torch.equal(P.cpu()[1], P_ref[1])
    torch.testing.assert_close(P.cpu(), P_ref, rtol=1e-5, atol=1e-5 * P_ref[:, 2:].max().item())


def test_op_skips_negative_slots_and_empty_batch():
    A, G = torch.randn(3, 4, 6), torch.randn(3, 4, 5)
    E, P, rows, xw, yw, vb = _accumulators(3, 6, 5, "cpu")
    E0, P0 = E.clone(), P.clone()
    dW, db = OP(A, G, E, P, rows, -1, -1, None, None, None, "direct")
    assert torch.equal(E, E0) and torch.equal(P, P0)
    _close(dW, reference.linear_fused(A, G)[0], 1e-5, _scales(A, G)["dW"])
    dW, db = OP(A[:0], G[:0], E, P, rows[:0], 0, 1, xw, yw, vb, "auto")
    assert torch.equal(E, E0) and dW.shape == (5, 6) and not dW.any() and not db.any()


def test_op_matches_the_cpp_op():
    """Same schema, same effect as gradstats.ops.linear_fused_collect."""
    A, G = torch.randn(3, 11, 9), torch.randn(3, 11, 7)
    E, P, rows, xw, yw, vb = _accumulators(3, 9, 7, "cpu")
    E2, P2 = E.clone(), P.clone()
    dW, db = OP(A, G, E, P, rows, 1, 2, xw, yw, vb, "direct")
    dW2, db2 = gradstats.ops.linear_fused_collect(A, G, E2, P2, rows, 1, 2, xw, yw, vb, "direct")
    for x, y in ((dW, dW2), (db, db2), (E, E2), (P, P2)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_op_errors_name_the_argument():
    A, G = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    E, P, rows, xw, yw, vb = _accumulators(2, 4, 5, "cpu")
    bad = [((A, G[:, :2], E, P, rows, 0, 1, None, None, None), "agree in every dim"),
           ((A.double(), G, E, P, rows, 0, 1, None, None, None), "A must be float16"),
           ((A, G, E.float(), P, rows, 0, 1, None, None, None), "E must be a float64"),
           ((A, G, E, P, rows.int(), 0, 1, None, None, None), "rows must be int64"),
           ((A, G, E, P, rows, 9, 1, None, None, None), "slot 9 out of range"),
           ((A, G, E, P, rows, 0, 1, xw[:3], yw, None), "xw must be [5, 2]"),
           ((A, G, E, P, rows, 0, 1, None, None, None, "outer"), "needs one position"),
           ((A, G, E, P, rows, 0, 1, None, None, None, "fast"), "strategy must be one of")]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            OP(*args)
    with pytest.raises(ValueError, match="different half dtypes: pass upcast=True"):
        fused_linear(A.half(), G.bfloat16(), upcast=False)
    with pytest.raises(ValueError, match="precision must be one of"):
        fused_linear(A, G, precision="fp32")


def test_opcheck():
    """Schema (mutations of E and P only), fake tensors, autograd registration and AOT
    dispatch, run under the interpreter."""
    A, G = torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    E, P, rows, xw, yw, vb = _accumulators(2, 6, 4, "cpu")
    torch.library.opcheck(OP, (A, G, E, P, rows, 0, 1, xw, yw, vb, "direct"))


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces a function calling the op (one opaque node, its
    fake giving the shapes) and the compiled function writes the same accumulators as the
    eager one called after it. (The inductor backend compiles it too, in ~30 s of C++ build on
    this CPU; aot_eager keeps the test fast: the op is opaque to both.)"""
    torch._dynamo.reset()

    def step(A, G, E, P, rows, xw, yw, vb):
        dW, db = torch.ops.gradstats.triton_linear_fused_collect(2 * A, G, E, P, rows, 0, 1,
                                                                 xw, yw, vb, "direct")
        return dW.t() * 3, db + 1

    A, G = torch.randn(2, 7, 6), torch.randn(2, 7, 5)
    E, P, rows, xw, yw, vb = _accumulators(2, 6, 5, "cpu")
    E2, P2 = E.clone(), P.clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(A, G, E2, P2, rows, xw,
                                                                        yw, vb)
    eager = step(A, G, E, P, rows, xw, yw, vb)
    for x, y in zip((*eager, E, P), (*compiled, E2, P2)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    assert not torch.equal(E, _accumulators(2, 6, 5, "cpu")[0])


# ------------------------------------------------------------------------- routing
def test_router_sends_only_cuda_half_and_float32_to_triton(monkeypatch):
    a, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    assert not kernels.use_triton(a, g)  # CPU tensors: the C++ op
    if torch.cuda.is_available():
        assert kernels.use_triton(a.cuda(), g.cuda().half()) == kernels.enabled()
        assert not kernels.use_triton(a.cuda().double(), g.cuda().double())
        monkeypatch.setenv("GRADSTATS_TRITON", "0")
        assert not kernels.use_triton(a.cuda(), g.cuda())
    E, P, rows, *_ = _accumulators(2, 4, 5, "cpu")
    dW, db = kernels.linear_fused_collect(a, g, E, P, rows, 0, 1, None, None, None)
    _close(dW, reference.linear_fused(a, g)[0], 1e-5, _scales(a, g)["dW"])


@pytest.mark.slow
def test_without_triton_the_package_imports_and_says_why(tmp_path):
    """A subprocess where ``import triton`` fails: the package imports, available() is False
    with the reason, the router uses the C++ op, and the kernels raise ImportError naming what
    to install."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch, gradstats
        from gradstats import kernels
        assert not kernels.available() and "triton" in kernels.unavailable_reason()
        A, G = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
        E, P = torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)
        dW, db = kernels.linear_fused_collect(A, G, E, P, torch.arange(2), 0, 1, None, None, None)
        assert E[0].gt(0).all()
        try:
            kernels.fused_linear(A, G)
        except ImportError as e:
            assert "pip install triton" in str(e), e
        else:
            raise AssertionError("no ImportError")
        print("ok")
    """)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    # run outside the checkout: from its root, ``import gradstats`` finds the unbuilt sources
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_cost_model_choice():
    """Gram for short T, the fused kernel for long T; the fused kernel's cost tends to the
    weight-gradient GEMM's as T grows (its epilogue is paid once per example) where the units
    share out evenly, and the model charges the busiest program where they do not."""
    assert cost.choose(8, 1, 768, 768) == "outer"
    assert cost.choose(8, 16, 768, 768) == "gram"
    assert cost.choose(8, 2048, 768, 768) == "direct"

    def ratio(B, T, d):
        return cost.fused(B, T, d, d).time(cost.H200, 2) / cost.gemm(B, T, d, d).time(cost.H200, 2)

    r = [ratio(132, T, 4096) for T in (128, 512, 8192)]  # 1024 tiles x 132 examples: even
    assert r[0] > r[1] > r[2] > 1.0 and r[2] < 1.01
    s = cost.schedule(36, 8, 132)  # 288 units on 132 programs: the busiest holds 3
    assert s.max_units == 3 and s.imbalance == 3 * 132 / 288
    assert ratio(8, 8192, 768) > 1.1  # whatever the tile: 768 x 768 at B = 8 is uneven


# ------------------------------------------------------------------------- compiled, no GPU
def _compile_sm90(kernel, pointers: dict[str, str], consts: dict, num_warps: int,
                  num_stages: int) -> tuple[str, str]:
    """(PTX, ptxas -v report) of ``kernel`` compiled ahead of time for sm_90 as the JIT
    specialises a typical launch: unit strides as constants, pointers and the other sizes and
    strides divisible by 16. Triton ships ptxas, so no GPU or CUDA toolkit is needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    jf = kernel.compiled
    sig = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in jf.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(jf.arg_names)
             if n not in consts and (n in pointers or n.startswith(("s", "T", "D_")))}
    k = triton.compile(ASTSource(jf, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", path, "-o", path + ".o"],
                             capture_output=True, text=True)
    return ptx, out.stderr


@pytest.mark.slow
def test_kernels_compile_for_hopper(monkeypatch, tmp_path):
    """The compiled path, checked without a GPU: for a contiguous bf16 launch the fused kernel's
    T loop is software-pipelined (16-byte cp.async into shared memory), its tile products run on
    wgmma (Hopper's tensor-core instruction), its norm atomics are relaxed, and nothing spills;
    the Gram kernel likewise. Compiled from scratch (an empty Triton cache) right after
    interpreted launches in the same process, which must leave triton.language as they found
    it (the interpreter's nested calls patch it and do not restore it)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    A, G = torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    fused_linear(A, G)
    gram_norms(A, G)
    # the modules (gradstats.kernels.fused_linear is also the name of the function)
    fl = importlib.import_module("gradstats.kernels.fused_linear")
    gr = importlib.import_module("gradstats.kernels.gram")
    fused = fl._kernels()[0]
    half = dict(A="*bf16", G="*bf16", DW="*bf16", SQ="*fp32", WS="*fp32", WSQ="*fp32", NW="*fp32")
    c = fl.config_for(torch.device("cuda"), torch.bfloat16, 768, 3072, B=8, T=1024)
    consts = dict(BLOCK_O=c.block_o, BLOCK_I=c.block_i, BLOCK_T=c.block_t, CAST="none",
                  PRECISION="ieee", WITH_SQ=False, NORM_ATOMIC=True, sa_i=1, sg_o=1)
    ptx, ptxas = _compile_sm90(fused, half, consts, c.num_warps, c.num_stages)
    for instr in ("wgmma.mma_async", "cp.async.cg.shared.global", "atom.global.gpu.relaxed.add"):
        assert instr in ptx, instr
    assert " 0 bytes spill stores" in ptxas, ptxas
    gram = gr.Kernel(gr.gradstats_gram_kernel)
    ptx, ptxas = _compile_sm90(gram, dict(A="*bf16", G="*bf16", NW="*fp32"),
                               dict(BLOCK_T=64, BLOCK_D=64, CAST="none", PRECISION="ieee",
                                    NORM_ATOMIC=True, sa_i=1, sg_o=1), 4, 2)
    assert "wgmma.mma_async" in ptx and "cp.async.cg.shared.global" in ptx
    assert " 0 bytes spill stores" in ptxas, ptxas


# ------------------------------------------------------------------------- GPU only
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dot_path_cuda(dtype):
    """Half operands straight to the tensor cores (upcast=False), on a shape that fills the GPU:
    whole tiles dealt round-robin and a split tail."""
    A, G = _inputs(Shape("gpu", 6, (300,), 768, 1000), dtype, "cuda")
    _check_both_routes(A, G, 1e-3, A, upcast=False)


@requires_cuda
@pytest.mark.cuda
def test_tf32_precision_cuda():
    """input_precision is a parameter: 'ieee' float32 is exact to float32 rounding, 'tf32'
    (Triton's default) rounds the operands to 10 mantissa bits, ~3e-4."""
    A, G = torch.randn(4, 256, 512, device="cuda"), torch.randn(4, 256, 384, device="cuda")
    ref = reference.linear_norms(A, G)[0]
    scale = _scales(A, G)["w"]
    _close(fused_linear(A, G, precision="ieee").weight_norms, ref, 1e-5, scale)
    _close(fused_linear(A, G, precision="tf32").weight_norms, ref, 3e-3, scale)
