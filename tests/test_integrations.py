"""The trainer callbacks in real runs (CPU, a few steps, gradient accumulation): each step's
tr(Sigma) and |G|^2 against per-example gradients taken by an autograd loop on a plain copy of
the model (so the units under accumulation are checked, the shorter last window of an epoch
and Hugging Face's num_items_in_batch included), the values the trainers logged against the
monitor's own, resumed runs against uninterrupted ones, and the controller's batch size and
learning rate.

The GradScaler path is not run here: Lightning on CPU swaps ``16-mixed`` for ``bf16-mixed`` (no
scaler) and Hugging Face's fp16 needs a GPU. It is covered by the plain-loop GradScaler tests in
test_monitor.py and by the GPU suite (benchmarks/gpu_suite.sh).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstats.apps.plot import read_run_log
from gradstats.logs import PREFIX, JsonlLogger

BETA = 0.8


def reference(per_example: torch.Tensor, weights: torch.Tensor | None = None):
    """(tr, g2) from per-example gradients ``[n, P]`` (per-example loss units), with the
    weighted-mean estimator when the examples entered the gradient with unequal weights."""
    g = per_example.double()
    n = g.shape[0]
    if weights is None:
        mean = g.mean(0)
        tr = float(((g - mean) ** 2).sum() / (n - 1))
        return tr, float(mean @ mean) - tr / n
    w = weights.double() / weights.double().sum()
    mean, w2 = w @ g, float(w @ w)
    mgs = float(mean @ mean)
    tr = (float((g * g).sum()) / n - mgs) / (1.0 - w2)
    return tr, mgs - tr * w2


def smoothed(trs: list[float], g2s: list[float]) -> float:
    """Ratio of the bias-corrected EMAs, from explicit weights."""
    t = len(trs)
    w = BETA ** np.arange(t - 1, -1, -1.0)
    return float(w @ trs / (w @ g2s))


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


# =============================================================================== Lightning
pl = pytest.importorskip("lightning.pytorch")
from gradstats.integrations.lightning import GradStatsCallback as LightningCallback


def small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


class Classifier(pl.LightningModule):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = small_net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.2)
        return {"optimizer": opt,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}


def loader() -> torch.utils.data.DataLoader:
    """40 examples in batches of 6: six full ones and one of 4, so with two micro-batches per
    step the last step of each epoch has one micro-batch of 4 (still divided by 2)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)


class LightningReference(pl.Callback):
    """Placed after the gradstats callback: per-example gradients of each step's examples on a
    plain copy of the network, the monitor's StepStats as returned, the lr of each step."""

    def __init__(self, gs: LightningCallback):
        self.gs, self.batches, self.ref, self.stats, self.lrs, self.acc = gs, [], [], [], [], []
        self.losses = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append([t.cpu().double() if t.is_floating_point() else t.cpu()
                             for t in batch])

    def on_train_start(self, trainer, pl_module):
        def seen(opt, args, kwargs):  # runs after the callback's pre-hook: the lr stepped with
            self.lrs.append((opt.param_groups[0]["lr"], trainer.lr_scheduler_configs[0]
                             .scheduler.get_last_lr()[0]))
        trainer.optimizers[0].register_step_pre_hook(seen)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        plain = small_net().double()
        plain.load_state_dict(pl_module.net.state_dict())
        with torch.no_grad():  # the step's loss: the mean of its micro-batches' mean losses
            self.losses.append(float(np.mean([F.cross_entropy(plain(bx), by)
                                              for bx, by in self.batches])))
        x = torch.cat([b[0] for b in self.batches])
        y = torch.cat([b[1] for b in self.batches])
        self.batches = []
        rows = []
        for i in range(len(x)):
            plain.zero_grad()
            F.cross_entropy(plain(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
            rows.append(flat_grads(plain))
        self.ref.append(reference(torch.stack(rows)))
        self.stats.append(self.gs.last_stats)
        self.acc.append(trainer.accumulate_grad_batches)


def fit(tmp: Path, epochs: int, ckpt: str | None = None, precision: str = "64-true",
        accelerator: str = "cpu", **cb_kwargs):
    gs = LightningCallback(loggers=JsonlLogger(tmp / "run.jsonl"), beta=BETA, **cb_kwargs)
    ref = LightningReference(gs)
    save = pl.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", save_top_k=-1, every_n_epochs=1,
                                        save_on_train_epoch_end=True)
    trainer = pl.Trainer(
        max_epochs=epochs, accumulate_grad_batches=2, precision=precision, accelerator=accelerator,
        callbacks=[gs, ref, save], logger=pl.loggers.CSVLogger(tmp, name="csv"),
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Classifier(), loader(), ckpt_path=ckpt)
    return gs, ref, trainer


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lightning")
    return tmp, *fit(tmp, epochs=2)


def test_lightning_statistics_match_per_example_gradients(lightning_run):
    _, gs, ref, _ = lightning_run
    assert [s.n for s in ref.stats] == [12, 12, 12, 4] * 2
    for s, (tr, g2) in zip(ref.stats, ref.ref):
        assert s.tr_sigma == pytest.approx(tr, rel=1e-9)
        assert s.g2 == pytest.approx(g2, rel=1e-8, abs=1e-12 * tr)
    trs, g2s = zip(*ref.ref)
    for t in range(2, len(trs) + 1):
        if sum(BETA ** (t - 1 - k) * g2s[k] for k in range(t)) > 0:
            assert ref.stats[t - 1].b_simple_ema == pytest.approx(
                smoothed(trs[:t], g2s[:t]), rel=1e-8)
    assert gs.monitor.layer_names == ["net.0", "net.2"]


def test_lightning_logged_values_are_the_monitors(lightning_run):
    tmp, _, ref, _ = lightning_run
    with open(next((tmp / "csv").glob("version_*/metrics.csv"))) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get(PREFIX + "b_simple_ema")]
    assert len(rows) == len(ref.stats)
    examples = 0
    for row, s in zip(rows, ref.stats):
        examples += s.n
        for key, want in (("b_simple", s.b_simple), ("b_simple_ema", s.b_simple_ema),
                          ("tr_sigma", s.tr_sigma), ("g2_ema", s.g2_ema),
                          ("b_simple_hi", s.b_simple_interval[1]),
                          ("layers/net.2/b_simple_ema", s.layers["net.2"].b_simple_ema)):
            got = float(row[PREFIX + key])
            assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-6)
        assert float(row[PREFIX + "examples"]) == examples
    # the callback's own JSONL log is a run log that `gradstats plot` reads
    log = read_run_log(tmp / "run.jsonl")
    assert [r["step"] for r in log] == list(range(1, len(ref.stats) + 1))
    assert [r["b_simple_ema"] for r in log] == [
        None if math.isnan(s.b_simple_ema) else s.b_simple_ema for s in ref.stats]
    assert [r["lr"] for r in log] == pytest.approx([lr for lr, _ in ref.lrs])
    assert [r["loss"] for r in log] == pytest.approx(ref.losses, rel=1e-9)


def test_lightning_resumed_run_continues_the_statistics(lightning_run, tmp_path):
    tmp, _, full, _ = lightning_run
    first = next((tmp / "ckpt").glob("epoch=0-*.ckpt"))
    resumed = fit(tmp_path, epochs=2, ckpt=str(first))[1]
    assert [s.step for s in resumed.stats] == [5, 6, 7, 8]
    # the smoothed values continue over the first run's steps 1-4 (the resumed steps are
    # compared with their own reference: a restored model differs from the uninterrupted one
    # by rounding, which a tiny |G|^2 amplifies)
    trs, g2s = zip(*(full.ref[:4] + resumed.ref))
    for t, s in enumerate(resumed.stats, start=5):
        assert s.tr_sigma_ema == pytest.approx(smoothed(trs[:t], [1.0] * t), rel=1e-9)
        assert s.b_simple_ema == pytest.approx(smoothed(trs[:t], g2s[:t]), rel=1e-8)
    log = read_run_log(tmp_path / "run.jsonl")
    assert log[0]["step"] == 5 and log[0]["examples"] == 40 + 12


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lightning_16_mixed_divides_the_scale_out(tmp_path):
    """On a GPU, 16-mixed runs a GradScaler (unscaled before the callback's hook): the
    statistics are those of per-example float64 gradients, to half precision."""
    gs, ref, trainer = fit(tmp_path, epochs=1, precision="16-mixed", accelerator="gpu")
    assert trainer.precision_plugin.scaler is not None
    assert all(s.loss_scale > 1.0 for s in ref.stats)
    for s, (tr, g2) in zip(ref.stats, ref.ref):
        assert s.tr_sigma == pytest.approx(tr, rel=2e-2)
        assert s.g2 == pytest.approx(g2, rel=5e-2, abs=2e-2 * tr)


def test_lightning_controller_sets_accumulation_per_epoch_and_scales_the_lr(tmp_path):
    from gradstats.schedulers import BatchSizeController

    ctl = BatchSizeController(6, 24, micro_batch_size=6, alpha=1000.0, hysteresis=0.0,
                              lr_rule="linear")
    gs, ref, trainer = fit(tmp_path, epochs=3, controller=ctl, layers=False)
    # epoch 1 runs at the controller's start (6 examples, 1 micro-batch per step); the size it
    # reaches during an epoch applies from the next one
    per_epoch = [ref.acc[0]]
    for a, b in zip(ref.acc, ref.acc[1:]):
        if b != a:
            per_epoch.append(b)
    assert per_epoch[0] == 1 and per_epoch[-1] == 4
    for (lr, scheduled), acc in zip(ref.lrs, ref.acc):
        assert lr == pytest.approx(scheduled * acc)  # linear rule: lr x B / B0
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0])  # restored after the step
    assert not any(k.startswith(PREFIX + "layers/") for k in gs.last_record)


def test_lightning_unwatched_module_is_named(tmp_path):
    class Direct(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)  # never calls self(...)

    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False,
                         callbacks=[LightningCallback()], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="module='net'"):
        trainer.fit(Direct().double(), loader())


# ============================================================================ Hugging Face
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from gradstats.contract import ContractError
from gradstats.integrations.huggingface import GradStatsCallback as HFCallback

GPT2 = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


class Tokens(torch.utils.data.Dataset):
    """20 sequences of 8 tokens; every third has its last 3 labels masked, so the valid-label
    counts differ between micro-batches."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (20, 8), generator=g)
        self.labels = self.ids.clone()
        self.labels[::3, -3:] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def gpt2(accepts_loss_kwargs: bool | None = None):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))
    if accepts_loss_kwargs is not None:
        model.accepts_loss_kwargs = accepts_loss_kwargs
    return model


class HFReference(transformers.TrainerCallback):
    """After the gradstats callback: per-example gradients (the token sum of each sequence) of
    each step on a plain copy, the micro-batches' valid-label counts, the gradient norm after
    the callback clipped, and the StepStats."""

    def __init__(self, gs: HFCallback, model):
        self.gs, self.calls, self.ref, self.stats, self.norms = gs, [], [], [], []
        self.weighted = not getattr(model, "accepts_loss_kwargs", True)
        model.register_forward_pre_hook(self._forward, with_kwargs=True)

    def _forward(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self.calls.append((kwargs["input_ids"], kwargs["labels"]))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        plain = transformers.GPT2LMHeadModel(model.config)
        plain.load_state_dict(model.state_dict())
        rows, weights = [], []
        for ids, labels in ((i.cpu(), lab.cpu()) for i, lab in self.calls):
            n_tok = int((labels[:, 1:] != -100).sum())
            for i in range(len(ids)):
                plain.zero_grad()
                logits = plain(input_ids=ids[i:i + 1]).logits[:, :-1]
                F.cross_entropy(logits.reshape(-1, 64), labels[i:i + 1, 1:].reshape(-1),
                                ignore_index=-100, reduction="sum").backward()
                rows.append(flat_grads(plain))
                weights.append(1.0 / n_tok)
        self.calls = []
        self.ref.append(reference(torch.stack(rows),
                                  torch.tensor(weights) if self.weighted else None))
        self.stats.append(self.gs.last_stats)
        self.norms.append(float(flat_grads(model).norm()))


def hf_train(tmp: Path, *, resume: str | None = None, accepts_loss_kwargs=None,
             save_steps: int | None = None, args_kwargs: dict | None = None, **cb_kwargs):
    model = gpt2(accepts_loss_kwargs)
    args = transformers.TrainingArguments(
        output_dir=str(tmp), per_device_train_batch_size=3, gradient_accumulation_steps=2,
        max_steps=4, learning_rate=3e-3, max_grad_norm=1.0, report_to=[], logging_steps=1,
        disable_tqdm=True, seed=0, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, **(args_kwargs or {"use_cpu": True}))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    gs = HFCallback(loggers=JsonlLogger(tmp / "run.jsonl"), beta=BETA, **cb_kwargs)
    gs.attach(trainer)
    ref = HFReference(gs, model)
    trainer.add_callback(ref)
    trainer.train(resume_from_checkpoint=resume)
    return gs, ref, trainer


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    return tmp, *hf_train(tmp, save_steps=2)


@pytest.mark.parametrize("route", ["num_items_in_batch",
                                   pytest.param("token_mean", marks=pytest.mark.slow)])
def test_hf_statistics_match_per_example_gradients(route, hf_run, tmp_path):
    if route == "num_items_in_batch":
        _, gs, ref, _ = hf_run
    else:  # the model takes no loss kwargs: its own token mean, divided by the micro-batches
        gs, ref, _ = hf_train(tmp_path, accepts_loss_kwargs=False)
    assert gs.units == route
    assert [s.n for s in ref.stats] == [6, 6, 6, 2]
    for s, (tr, g2) in zip(ref.stats, ref.ref):
        assert s.tr_sigma == pytest.approx(tr, rel=1e-4)
        assert s.g2 == pytest.approx(g2, rel=1e-3, abs=1e-4 * tr)
    trs, g2s = zip(*ref.ref)
    for t, s in enumerate(ref.stats, start=1):
        assert s.tr_sigma_ema == pytest.approx(smoothed(trs[:t], [1.0] * t), rel=1e-4)
        assert s.g2_ema == pytest.approx(smoothed(g2s[:t], [1.0] * t), rel=1e-3,
                                         abs=1e-4 * s.tr_sigma_ema)


def test_hf_logs_are_the_monitors_and_clipping_comes_after(hf_run):
    tmp, _, ref, trainer = hf_run
    logged = [h for h in trainer.state.log_history if PREFIX + "b_simple_ema" in h]
    assert [h["step"] for h in logged] == [1, 2, 3, 4]
    for h, s in zip(logged, ref.stats):
        for key, want in (("tr_sigma", s.tr_sigma), ("g2", s.g2), ("b_simple_ema",
                          s.b_simple_ema), ("b_simple_lo", s.b_simple_interval[0])):
            got = h[PREFIX + key]
            assert (math.isnan(got) and math.isnan(want)) or got == want
        assert not any("/layers/" in k for k in h)  # per layer: in the callback's own loggers
    # the Trainer's grad_norm is the norm before clipping; the callback clipped to 1.0 after
    # measuring, and gave the Trainer its max_grad_norm back
    assert max(h["grad_norm"] for h in logged) > 1.0
    assert all(n <= 1.0 + 1e-5 for n in ref.norms)
    assert trainer.args.max_grad_norm == 1.0
    log = read_run_log(tmp / "run.jsonl")
    assert [r["layers"]["transformer.h.0.mlp.c_fc"]["g2_ema"] for r in log] == [
        s.layers["transformer.h.0.mlp.c_fc"].g2_ema for s in ref.stats]
    assert [r["batch_size"] for r in log] == [6, 6, 6, 2]
    assert [r["examples"] for r in log] == [6, 12, 18, 20]
    assert [r["lr"] for r in log] == pytest.approx([h["learning_rate"] for h in logged])
    assert [r["loss"] for r in log] == pytest.approx([h["loss"] for h in logged], rel=1e-5)


def test_hf_resumed_run_continues_the_statistics(hf_run, tmp_path):
    tmp, _, full, _ = hf_run
    resumed = hf_train(tmp_path, resume=str(tmp / "checkpoint-2"))[1]
    assert [s.step for s in resumed.stats] == [3, 4]
    trs, g2s = zip(*(full.ref[:2] + resumed.ref))
    for t, s in enumerate(resumed.stats, start=3):  # the EMAs continue over steps 1-2
        assert s.tr_sigma_ema == pytest.approx(smoothed(trs[:t], [1.0] * t), rel=1e-4)
        assert s.g2_ema == pytest.approx(smoothed(g2s[:t], [1.0] * t), rel=1e-3,
                                         abs=1e-4 * s.tr_sigma_ema)
    assert read_run_log(tmp_path / "run.jsonl")[0]["examples"] == 18


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hf_fp16_divides_the_scale_out_and_clips_after(tmp_path):
    """fp16 on a GPU: the accelerator's GradScaler reaches the monitor through attach (the
    Trainer has unscaled .grad before on_pre_optimizer_step); statistics as in float32 to half
    precision, clipping after the measurement."""
    gs, ref, trainer = hf_train(tmp_path, args_kwargs={"fp16": True})
    assert trainer.accelerator.scaler is not None and gs.monitor.units.scaler is not None
    assert all(s.loss_scale > 1.0 for s in ref.stats if not s.skipped)
    for s, (tr, g2) in zip(ref.stats, ref.ref):
        if not s.skipped:
            assert s.tr_sigma == pytest.approx(tr, rel=2e-2)
            assert s.g2 == pytest.approx(g2, rel=5e-2, abs=2e-2 * tr)
    assert all(n <= 1.0 + 1e-3 for n in ref.norms)


def test_hf_wrong_units_are_named(tmp_path):
    with pytest.raises(ContractError, match="loss_units"):
        hf_train(tmp_path, loss_units="mean")
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        HFCallback(_rebuilt_by_trainer=True)
    with pytest.raises(ValueError, match="accumulation"):
        HFCallback(accumulation="sum")
