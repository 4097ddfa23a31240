"""The training-stack integrations end to end on tiny models, on the CPU: a Lightning module on
scikit-learn's digits and a BERT built from a config under transformers' Trainer, each pruned by
AGP during training, removed physically, saved, reloaded and trained on."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim.demo import load_digits_tensors
from torchslim.schedules import agp_sparsity

from _ddp_shared import TokenDataset

# -- shared helpers ---------------------------------------------------------------------------------


def zero_fraction(weight: torch.Tensor) -> float:
    """Share of output rows (filters, units) that are all zero."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    return float((rows.abs().sum(1) == 0).float().mean())


def expected_levels(*, final: float, start: int, total: int, frequency: int, last_step: int) -> dict[int, float]:
    """AGP's target after every optimizer step: it moves only at update steps."""
    levels, current = {}, 0.0
    for t in range(1, last_step + 1):
        if t >= start and (t - start) % frequency == 0:
            current = max(current, agp_sparsity(t, initial=0.0, final=final, start=start, steps=total))
        levels[t] = current
    return levels


def changes(values: dict[int, float]) -> list[int]:
    steps = sorted(values)
    return [t for prev, t in zip([0] + steps, steps) if values[t] != values.get(prev, 0.0)]


# -- Lightning ----------------------------------------------------------------------------------------


def digits_loader(batch_size: int = 64):
    x, y, x_test, _ = load_digits_tensors(seed=0)
    dataset = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    return loader, x_test[:64]


def lightning_module():
    import lightning.pytorch as pl

    class DigitsModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                     nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                                     nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
            self.optimizer: torch.optim.Optimizer | None = None
            self.losses: list[float] = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.losses.append(float(loss))
            return loss

        def configure_optimizers(self):  # the same optimizer (and its state) in every fit
            if self.optimizer is None:
                self.optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
            scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=5, gamma=0.5)
            return {"optimizer": self.optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return DigitsModule()


def lightning_trainer(max_steps: int, callbacks=()):
    import lightning.pytorch as pl

    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=list(callbacks))


def lightning_recorders(x_test: torch.Tensor, capture_step: int | None):
    """(before, after): ``after`` records the zero-filter shares and widths after every optimizer
    step (it runs after the AGP callback); ``before`` keeps the masked model's outputs just before
    the removal (at ``capture_step``, or at the end of training)."""
    import lightning.pytorch as pl

    def outputs(module):
        with torch.no_grad(), torchslim.training_mode(module, False):
            return module(x_test).clone()

    class Before(pl.Callback):
        masked = None

        def on_train_batch_end(self, trainer, module, outputs_, batch, batch_idx):
            if trainer.global_step == capture_step:
                self.masked = outputs(module)

        def on_train_end(self, trainer, module):
            if capture_step is None:
                self.masked = outputs(module)

    class After(pl.Callback):
        def __init__(self):
            self.zeros: dict[int, tuple[float, float]] = {}
            self.widths: dict[int, tuple[int, int]] = {}
            self.pruned = None

        def on_train_batch_end(self, trainer, module, outputs_, batch, batch_idx):
            step = trainer.global_step
            self.zeros[step] = (zero_fraction(module.net[0].weight), zero_fraction(module.net[3].weight))
            self.widths[step] = (module.net[0].out_channels, module.net[3].out_channels)
            if step == capture_step:
                self.pruned = outputs(module)

    return Before(), After()


def check_schedule(zeros: dict[int, tuple[float, float]], levels: dict[int, float], last: int) -> None:
    for step in range(1, last + 1):  # each layer's zeroed share is the schedule's, to the channel
        for share, width in zip(zeros[step], (32, 64)):
            assert abs(share - levels[step]) <= 1.0 / width, (step, share, levels[step])
    measured = {t: zeros[t][0] for t in range(1, last + 1)}
    assert changes(measured) == changes(levels)  # masks grew at exactly the scheduled steps


def test_lightning_agp_removes_at_the_end_saves_loads_and_trains_on(tmp_path):
    from torchslim.integrations.lightning import AGPCallback

    loader, x_test = digits_loader()
    module = lightning_module()
    params_before = sum(p.numel() for p in module.parameters())
    agp = AGPCallback(final_sparsity=0.75, start_step=2, total_steps=6, frequency=2, save_dir=tmp_path / "agp")
    before, after = lightning_recorders(x_test, capture_step=None)
    lightning_trainer(10, [before, agp, after]).fit(module, loader)

    levels = expected_levels(final=0.75, start=2, total=6, frequency=2, last_step=10)
    assert changes(levels) == [4, 6, 8]
    assert agp.history == [(t, pytest.approx(levels[t])) for t in range(1, 11)]
    check_schedule(after.zeros, levels, 10)
    assert after.zeros[10] == (0.75, 0.75) and after.widths[10] == (32, 64)  # masked, not removed, while training

    # removed at the end: 8 of 32 and 16 of 64 filters left, MACs and parameters down
    assert (module.net[0].out_channels, module.net[3].out_channels, module.net[9].in_features) == (8, 16, 16)
    result = agp.result
    assert result.macs_after < 0.2 * result.macs_before
    assert torchslim.analyze(module, x_test[:1]).total_macs == result.macs_after
    assert sum(p.numel() for p in module.parameters()) < 0.15 * params_before
    with torch.no_grad(), torchslim.training_mode(module, False):
        pruned = module(x_test)
    torch.testing.assert_close(pruned, before.masked, atol=1e-5, rtol=1e-5)

    fresh = torchslim.load(tmp_path / "agp", lightning_module())
    with torch.no_grad(), torchslim.training_mode(fresh, False):
        assert torch.equal(fresh(x_test), pruned)

    # one more fit step on the same Adam: its state was sliced with the weights
    weight = module.net[0].weight.detach().clone()
    lightning_trainer(1).fit(module, loader)
    assert not torch.equal(module.net[0].weight, weight)
    state = module.optimizer.state[module.net[0].weight]
    assert state["exp_avg"].shape == module.net[0].weight.shape == (8, 1, 3, 3)


def test_lightning_agp_removes_mid_training_and_the_same_optimizer_goes_on():
    from torchslim.integrations.lightning import AGPCallback

    loader, x_test = digits_loader()
    module = lightning_module()
    agp = AGPCallback(final_sparsity=0.5, start_step=0, total_steps=4, frequency=1, criterion="l2", finalize_step=6)
    before, after = lightning_recorders(x_test, capture_step=6)
    trainer = lightning_trainer(12, [before, agp, after])
    trainer.fit(module, loader)

    levels = expected_levels(final=0.5, start=0, total=4, frequency=1, last_step=5)
    check_schedule(after.zeros, levels, 5)
    assert [after.widths[t] for t in (5, 6, 12)] == [(32, 64), (16, 32), (16, 32)]  # removed after step 6
    torch.testing.assert_close(after.pruned, before.masked, atol=1e-5, rtol=1e-5)
    assert len(module.losses) == 12 and all(torch.isfinite(torch.tensor(module.losses)))
    assert trainer.global_step == 12
    assert module.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 2)  # the scheduler went on
    for param in module.parameters():
        assert module.optimizer.state[param]["exp_avg"].shape == param.shape


def test_lightning_schedule_past_max_steps_fails_before_training():
    from torchslim.integrations.lightning import AGPCallback

    loader, _ = digits_loader()
    module = lightning_module()
    weight = module.net[0].weight.detach().clone()
    agp = AGPCallback(final_sparsity=0.5, start_step=4, total_steps=10)
    with pytest.raises(ValueError, match=r"ends at optimizer step 14 .* stops after 8 steps"):
        lightning_trainer(8, [agp]).fit(module, loader)
    assert torch.equal(module.net[0].weight, weight) and not module.losses


# -- Hugging Face Trainer -------------------------------------------------------------------------------


def tiny_bert():
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    return transformers.BertForSequenceClassification(config)


def hf_trainer(model, max_steps: int, callbacks, tmp_path):
    import transformers

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=max_steps,
                                          per_device_train_batch_size=8, learning_rate=1e-3, report_to=[],
                                          save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=list(callbacks))


def test_hf_trainer_agp_on_bert_removes_heads_and_units_saves_loads_and_trains_on(tmp_path):
    import transformers

    from torchslim.integrations.hf_trainer import AGPTrainerCallback

    model = tiny_bert()
    macs_model = tiny_bert()
    probe = {"input_ids": TokenDataset().ids[:4], "attention_mask": torch.ones(4, 16, dtype=torch.long)}

    def logits(m):
        with torch.no_grad(), torchslim.training_mode(m, False):
            return m(**probe).logits.clone()

    class Before(transformers.TrainerCallback):
        masked = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 8:
                self.masked = logits(model)

    class After(transformers.TrainerCallback):
        def __init__(self):
            self.zeros, self.widths, self.pruned = {}, {}, None

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            layer = model.bert.encoder.layer[0]
            q = layer.attention.self.query.weight.detach()
            heads = q.reshape(-1, 16, q.shape[1]).abs().sum((1, 2)) == 0  # 16 = head size
            self.zeros[state.global_step] = (zero_fraction(layer.intermediate.dense.weight), float(heads.float().mean()))
            self.widths[state.global_step] = (layer.intermediate.dense.out_features, q.shape[0])
            if state.global_step == 8:
                self.pruned = logits(model)

    agp = AGPTrainerCallback(final_sparsity=0.5, start_step=0, total_steps=6, frequency=2, finalize_step=8,
                             save_dir=tmp_path / "bert")
    before, after = Before(), After()
    trainer = hf_trainer(model, 12, [before, agp, after], tmp_path)
    output = trainer.train()

    levels = expected_levels(final=0.5, start=0, total=6, frequency=2, last_step=7)
    assert changes(levels) == [2, 4, 6]
    assert [s for _, s in agp.history[:7]] == pytest.approx([levels[t] for t in range(1, 8)])
    for t in range(1, 8):  # FFN units: the schedule's share, to the unit; heads: 1 of 2 once the target reaches 0.5
        assert abs(after.zeros[t][0] - levels[t]) <= 1 / 64
        assert after.zeros[t][1] == (0.5 if levels[t] >= 0.5 else 0.0)
    assert changes({t: after.zeros[t][0] for t in range(1, 8)}) == [2, 4, 6]
    assert [after.widths[t] for t in (7, 8, 12)] == [(64, 32), (32, 16), (32, 16)]  # removed after step 8
    torch.testing.assert_close(after.pruned, before.masked, atol=1e-5, rtol=1e-5)

    result = agp.result
    x1 = {k: v[:1] for k, v in probe.items()}
    full_macs = torchslim.analyze(macs_model, x1).total_macs
    assert torchslim.analyze(model, x1).total_macs < 0.7 * full_macs
    assert result.macs_after < 0.7 * result.macs_before

    # training went on with the same AdamW (sliced) and scheduler: 12 steps, finite loss
    assert trainer.state.global_step == 12 and torch.isfinite(torch.tensor(output.training_loss))
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper
    for param in model.parameters():
        if param in optimizer.state:
            assert optimizer.state[param]["exp_avg"].shape == param.shape
    assert any(e.get("sparsity") == 0.5 for e in trainer.state.log_history)

    # the checkpoint written at step 8 reloads into a fresh BERT (equal to the model as it was then)
    fresh = torchslim.load(tmp_path / "bert", tiny_bert())
    torch.testing.assert_close(logits(fresh), after.pruned, atol=0, rtol=0)


def test_hf_trainer_bad_input_fails_before_training(tmp_path):
    from torchslim.integrations.hf_trainer import AGPTrainerCallback

    model = tiny_bert()
    weight = model.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    trainer = hf_trainer(model, 6, [AGPTrainerCallback(final_sparsity=0.5, start_step=2, total_steps=8)], tmp_path)
    with pytest.raises(ValueError, match=r"ends at optimizer step 10 .* stops after 6 steps"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert torch.equal(model.bert.encoder.layer[0].intermediate.dense.weight, weight)

    with pytest.raises(ValueError, match="criterion 'nope' is unknown"):
        AGPTrainerCallback(final_sparsity=0.5, total_steps=4, criterion="nope")
    with pytest.raises(ValueError, match="measures the model on data"):
        AGPTrainerCallback(final_sparsity=0.5, total_steps=4, criterion="taylor")
    with pytest.raises(ValueError, match="final_sparsity < 1"):
        AGPTrainerCallback(final_sparsity=1.2, total_steps=4)
    with pytest.raises(ValueError, match=r"finalize_step=3 must be .* start_step \+ total_steps = 4"):
        AGPTrainerCallback(final_sparsity=0.5, total_steps=4, finalize_step=3)
    with pytest.raises(ValueError, match=r"target_macs=0\.5 would be ignored"):
        AGPTrainerCallback(final_sparsity=0.5, total_steps=4, config=torchslim.PruneConfig(target_macs=0.5))


# -- optional extras ------------------------------------------------------------------------------------


@pytest.mark.parametrize("module, missing, extra", [
    ("torchslim.integrations.lightning", ["lightning", "lightning.pytorch"], "torchslim[lightning]"),
    ("torchslim.integrations.hf_trainer", ["transformers"], "torchslim[hf]"),
])
def test_a_missing_framework_names_the_extra(monkeypatch, module, missing, extra):
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=re.escape(f"pip install '{extra}'")):
        importlib.import_module(module)
    import torchslim.integrations  # the package itself imports neither framework

    assert torchslim.integrations.sync_masks_ is not None


# -- two real processes (gloo on the CPU) -----------------------------------------------------------------

TESTS = Path(__file__).parent


def run_two_ranks(command: list[str], out: Path) -> list[dict]:
    """Run ``command`` (which starts two ranks that each write OUT/rank{r}.json); both reports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(torchslim.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command + [str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def check_two_ranks(reports: list[dict]) -> None:
    for report in reports:
        assert report["world_size"] == 2
        assert report["history"] == [[1, 0.0], [2, 0.4375], [3, 0.4375], [4, 0.5], [5, 0.5], [6, 0.5]]
        assert report["masks_differed"] == 0  # AGPPruner already takes rank 0's choice at every update
    assert reports[0]["digest"] == reports[1]["digest"]  # the same pruned weights on both ranks


def test_lightning_ddp_two_processes_mask_alike(tmp_path):
    reports = run_two_ranks([sys.executable, str(TESTS / "_ddp_lightning.py")], tmp_path)
    check_two_ranks(reports)
    assert reports[0]["widths"] == [16, 32] and reports[0]["macs"][1] < 0.3 * reports[0]["macs"][0]
    spec = importlib.util.spec_from_file_location("_ddp_lightning", TESTS / "_ddp_lightning.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fresh = torchslim.load(tmp_path / "ckpt", script.Net())  # rank 0's checkpoint
    assert script.digest(fresh) == reports[0]["digest"]


def test_hf_trainer_under_torchrun_two_processes_mask_alike(tmp_path):
    reports = run_two_ranks([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(TESTS / "_ddp_hf.py")], tmp_path)
    check_two_ranks(reports)
    assert reports[0]["ffn"] == 32 and reports[0]["macs"] == [296000, 148000]


def test_a_resumed_run_catches_up_with_the_schedule():
    from torchslim.integrations._agp import AGPDriver, AGPSettings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    driver = AGPDriver(AGPSettings(final_sparsity=0.5, total_steps=6, frequency=2))
    driver.start(model, optimizer, batch=(torch.randn(4, 1, 8, 8), None), step=5)  # resumed after step 5
    level = agp_sparsity(4, initial=0.0, final=0.5, start=0, steps=6)  # the last update at or before 5
    assert driver.pruner.t == 5 and driver.sparsity == pytest.approx(level)
    assert abs(zero_fraction(model[0].weight) - level) <= 1 / 32
    driver.advance(6)
    assert driver.history == [(6, 0.5)] and zero_fraction(model[0].weight) == 0.5
