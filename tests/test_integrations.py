"""The Lightning and Hugging Face Trainer callbacks, on real fits of tiny models on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# The Hugging Face libraries read these when they are first imported. The tests build
# their models from configs and must never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import duckdb
import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typer.testing import CliRunner

from runlens.cli import app
from runlens.integrations.lightning import RunlensCallback as LightningCallback
from recorder_helpers import part_files

REPO_ROOT = Path(__file__).resolve().parents[1]


def read_table(run_dir: Path, table: str) -> list[dict]:
    """Return a table's rows, ordered by step, from its Parquet parts."""
    files = [str(path) for path in part_files(run_dir, table)]
    assert files, f"{run_dir} has no {table} parts"
    relation = duckdb.sql(f"SELECT * FROM read_parquet({files!r}, union_by_name = true) "
                          "ORDER BY step")
    return [dict(zip(relation.columns, row)) for row in relation.fetchall()]


def analyze_json(run_dir: Path, output: Path) -> dict:
    result = CliRunner().invoke(app, ["analyze", str(run_dir), "--format", "json", "-o",
                                      str(output), "--fail-on", "never"])
    assert result.exit_code == 0, result.output
    return json.loads(output.read_text())


# -- Lightning ------------------------------------------------------------------------------


class Regression(pl.LightningModule):
    """A two-layer regression that keeps each batch loss and each gradient norm it saw."""

    def __init__(self, lr: float = 0.05, fail_at_step: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        # (global step when the batch ran, batch loss), where the global step is the
        # optimizer step that the batch belongs to
        self.batch_losses: list[tuple[int, float]] = []
        self.grad_norms: list[float] = []
        self.val_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        if self.hparams.fail_at_step == self.trainer.global_step:
            raise RuntimeError("injected failure")
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.net(inputs), targets)
        self.batch_losses.append((self.trainer.global_step, loss.item()))
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this after backward and before clipping.
        norms = [param.grad.norm() for param in self.parameters() if param.grad is not None]
        self.grad_norms.append(torch.linalg.vector_norm(torch.stack(norms)).item())

    def validation_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.net(inputs), targets)
        self.val_losses.append(loss.item())
        self.log("val_loss", loss)
        self.log("val/mae", (self.net(inputs) - targets).abs().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def regression_data(examples: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(examples, 4, generator=generator)
    return DataLoader(TensorDataset(inputs, inputs.sum(dim=1, keepdim=True)), batch_size=8)


def lightning_trainer(callback, **options) -> pl.Trainer:
    settings = {"accelerator": "cpu", "devices": 1, "logger": False,
                "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "num_sanity_val_steps": 0}
    settings.update(options)
    return pl.Trainer(callbacks=[callback], **settings)


@pytest.mark.parametrize("accumulate, clip", [(1, None), (4, 0.5)])
def test_lightning_records_optimizer_steps(tmp_path: Path, accumulate: int,
                                           clip: float | None) -> None:
    torch.manual_seed(0)
    module = Regression()
    run_dir = tmp_path / "run"
    # 18 batches per epoch: with accumulate_grad_batches=4 the last step of each epoch
    # accumulates only 2 batches.
    trainer = lightning_trainer(LightningCallback(run_dir), max_epochs=2,
                                accumulate_grad_batches=accumulate, gradient_clip_val=clip)
    trainer.fit(module, regression_data(144, seed=1), regression_data(32, seed=2))

    scalars = read_table(run_dir, "scalars")
    assert [row["step"] for row in scalars] == list(range(trainer.global_step))
    assert trainer.global_step == 2 * -(-18 // accumulate)
    batches_per_step: dict[int, list[float]] = {}
    for step, loss in module.batch_losses:
        batches_per_step.setdefault(step, []).append(loss)
    assert sorted(batches_per_step) == list(range(trainer.global_step))
    for row in scalars:
        expected = batches_per_step[row["step"]]
        assert len(expected) in ((accumulate,) if accumulate == 1 else (4, 2))
        assert row["loss"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    # grad_norm is measured after the closure computed this step's gradients, and after
    # clipping.
    assert len(module.grad_norms) == len(scalars)
    for row, norm in zip(scalars, module.grad_norms):
        if clip is None:
            assert row["grad_norm"] == pytest.approx(norm, rel=1e-4)
            assert row.get("clip_total_norm") is None
        else:
            assert row["clip_total_norm"] == pytest.approx(norm, rel=1e-4)
            assert row["clip_max_norm"] == clip
            assert row["grad_norm"] == pytest.approx(min(norm, clip), rel=1e-4)
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["optimizer"]["class"] == "SGD"
    assert meta["scheduler"] == {"class": "StepLR"}
    assert meta["config"]["lr"] == 0.05
    assert {param["name"] for param in meta["params"]} >= {"net.0.weight", "net.2.bias"}


def test_lightning_records_validation_metrics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Regression()
    run_dir = tmp_path / "run"
    trainer = lightning_trainer(LightningCallback(run_dir), max_epochs=3,
                                num_sanity_val_steps=2)
    trainer.fit(module, regression_data(64, seed=1), regression_data(16, seed=2))

    evals = read_table(run_dir, "evals")
    # One validation per epoch, at the epoch's last step (8 steps per epoch). The sanity
    # check before training is not recorded.
    assert {(row["step"], row["metric"]) for row in evals} == {
        (step, metric) for step in (7, 15, 23) for metric in ("loss", "mae")}
    assert {row["split"] for row in evals} == {"val"}
    # Each validation has 2 batches, and the logged value is their mean. The first 2
    # values of val_losses come from the sanity check.
    val_losses = module.val_losses[2:]
    losses = [row["value"] for row in evals if row["metric"] == "loss"]
    expected = [sum(val_losses[i:i + 2]) / 2 for i in (0, 2, 4)]
    assert losses == pytest.approx(expected, rel=1e-5)


def test_lightning_resume_appends_segment(tmp_path: Path) -> None:
    torch.manual_seed(0)
    run_dir = tmp_path / "run"
    first = lightning_trainer(LightningCallback(run_dir), max_steps=6)
    first.fit(Regression(), regression_data(64, seed=1))
    checkpoint = tmp_path / "step6.ckpt"
    first.save_checkpoint(checkpoint)

    second = lightning_trainer(LightningCallback(run_dir), max_steps=12)
    second.fit(Regression(), regression_data(64, seed=1), ckpt_path=checkpoint)

    meta = json.loads((run_dir / "run.json").read_text())
    assert [segment["start_step"] for segment in meta["segments"]] == [0, 6]
    scalars = read_table(run_dir, "scalars")
    assert [row["step"] for row in scalars] == list(range(12))
    assert [row["segment"] for row in scalars] == [0] * 6 + [1] * 6
    # SGD with momentum keeps one buffer per parameter (4 tensors), and the resumed
    # optimizer starts from the checkpoint's buffers.
    assert scalars[6]["optimizer_state_tensors"] == 4
    loads = [(row["segment"], json.loads(row["detail"])["object"])
             for row in read_table(run_dir, "events") if row["kind"] == "checkpoint_load"]
    assert sorted(loads) == [(1, "model"), (1, "optimizer"), (1, "scheduler")]

    report = analyze_json(run_dir, tmp_path / "report.json")
    assert report["run"]["steps"] == 12
    assert report["run"]["segments"] == 2
    assert report["errored"] == []
    assert "optimizer-state-mismatch" in report["passed"]


def test_lightning_exception_closes_recorder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    run_dir = tmp_path / "run"
    callback = LightningCallback(run_dir, flush_every=1000)
    trainer = lightning_trainer(callback, max_steps=10)
    with pytest.raises(RuntimeError, match="injected failure"):
        trainer.fit(Regression(fail_at_step=5), regression_data(64, seed=1))

    assert callback.recorder is None
    # flush_every=1000 kept every row in memory until close wrote them.
    assert [row["step"] for row in read_table(run_dir, "scalars")] == list(range(5))
    errors = [json.loads(row["detail"]) for row in read_table(run_dir, "events")
              if row["kind"] == "training_error"]
    assert errors == [{"message": "injected failure", "type": "RuntimeError"}]
    # Closing removed the recorder's clipping wrapper and every optimizer hook.
    assert not hasattr(torch.nn.utils.clip_grad_norm_, "_runlens_probe")
    assert not trainer.optimizers[0]._optimizer_step_pre_hooks
    assert not trainer.optimizers[0]._optimizer_step_post_hooks


def test_lightning_rejects_options_it_sets(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="sets model= itself"):
        LightningCallback(tmp_path / "run", model=nn.Linear(1, 1))
    with pytest.raises(TypeError, match=r"unknown recorder options \['param_stat_every'\]"):
        LightningCallback(tmp_path / "run", param_stat_every=10)
    assert not (tmp_path / "run").exists()


def test_pytorch_lightning_callback(tmp_path: Path) -> None:
    import pytorch_lightning
    from runlens.integrations.lightning import PytorchLightningCallback

    class OldRegression(pytorch_lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return nn.functional.mse_loss(self.net(inputs), targets)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    run_dir = tmp_path / "run"
    trainer = pytorch_lightning.Trainer(
        callbacks=[PytorchLightningCallback(run_dir)], max_steps=5, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False)
    trainer.fit(OldRegression(), regression_data(64, seed=1))
    scalars = read_table(run_dir, "scalars")
    assert [row["step"] for row in scalars] == list(range(5))
    assert all(row["loss"] is not None for row in scalars)


# -- Hugging Face Trainer ---------------------------------------------------------------------


class RandomTokens(Dataset):
    """Random token ids with labels: a class per sequence, or the ids themselves for a LM."""

    def __init__(self, examples: int, seed: int, causal_lm: bool) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 50, (examples, 12), generator=generator)
        self.causal_lm = causal_lm

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        if self.causal_lm:
            return {"input_ids": ids, "labels": ids}
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": ids[0] % 2}


class PlainClassifier(nn.Module):
    """A classifier that is no transformers model: its forward takes no **kwargs."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.embedding(input_ids).mean(dim=1))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def tiny_model(kind: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1,
                                         n_head=2, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32,
                                         max_position_embeddings=16, num_labels=2)
        return transformers.AutoModelForSequenceClassification.from_config(config)
    return PlainClassifier()


# How the Trainer (5.25) combines the 2 micro-batch losses of a step differs by model.
# GPT-2 normalizes its loss over the whole accumulated batch with num_items_in_batch, so
# the Trainer adds the losses. The BERT classifier also gets num_items_in_batch, because
# its forward takes **kwargs, but returns each micro-batch's mean, which the Trainer adds
# all the same. The plain module gets no num_items_in_batch, so the Trainer averages.
@pytest.mark.parametrize("kind", ["gpt2", "bert", "plain"])
def test_transformers_records_each_step(tmp_path: Path, kind: str) -> None:
    import transformers
    from runlens.integrations.transformers import RunlensCallback

    run_dir = tmp_path / "run"
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_steps=12, eval_strategy="steps", eval_steps=4,
        logging_steps=1, max_grad_norm=0.3, learning_rate=1e-3, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(
        model=tiny_model(kind), args=args,
        train_dataset=RandomTokens(64, seed=1, causal_lm=kind == "gpt2"),
        eval_dataset=RandomTokens(16, seed=2, causal_lm=kind == "gpt2"),
        callbacks=[RunlensCallback(run_dir)])
    trainer.train()

    scalars = read_table(run_dir, "scalars")
    assert [row["step"] for row in scalars] == list(range(trainer.state.global_step))
    assert trainer.state.global_step == 12
    # logging_steps=1 makes the Trainer log the loss and the pre-clip norm of every step.
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, 13))
    for row, entry in zip(scalars, logged):
        assert row["loss"] == pytest.approx(entry["loss"], rel=1e-5)
        assert row["clip_total_norm"] == pytest.approx(entry["grad_norm"], rel=1e-5)
        assert row["clip_max_norm"] == pytest.approx(0.3)
        assert row["grad_norm"] == pytest.approx(min(entry["grad_norm"], 0.3), rel=1e-4)

    evals = read_table(run_dir, "evals")
    eval_losses = [entry["eval_loss"] for entry in trainer.state.log_history
                   if "eval_loss" in entry]
    assert [(row["step"], row["split"], row["metric"]) for row in evals] == [
        (3, "val", "loss"), (7, "val", "loss"), (11, "val", "loss")]
    assert [row["value"] for row in evals] == pytest.approx(eval_losses, rel=1e-6)

    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["optimizer"]["class"] == "AdamW"
    assert meta["scheduler"] == {"class": "LambdaLR"}
    assert meta["config"]["training_args"]["gradient_accumulation_steps"] == 2
    assert not hasattr(torch.nn.utils.clip_grads_with_norm_, "_runlens_clip_watch")

    report = analyze_json(run_dir, tmp_path / "report.json")
    assert report["run"]["steps"] == 12
    assert "evals" in report["run"]["tables"]
    assert report["errored"] == []


def test_transformers_resume_appends_segment(tmp_path: Path) -> None:
    import transformers
    from runlens.integrations.transformers import RunlensCallback

    run_dir = tmp_path / "run"
    data = RandomTokens(64, seed=1, causal_lm=False)

    def train(max_steps: int, resume_from: Path | None = None) -> None:
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
            gradient_accumulation_steps=2, max_steps=max_steps, save_strategy="steps",
            save_steps=4, report_to="none", use_cpu=True, disable_tqdm=True)
        trainer = transformers.Trainer(model=tiny_model("plain"), args=args, train_dataset=data,
                                       callbacks=[RunlensCallback(run_dir)])
        trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))

    train(4)
    train(8, resume_from=tmp_path / "out" / "checkpoint-4")

    meta = json.loads((run_dir / "run.json").read_text())
    assert [segment["start_step"] for segment in meta["segments"]] == [0, 4]
    scalars = read_table(run_dir, "scalars")
    assert [row["step"] for row in scalars] == list(range(8))
    assert all(row["loss"] is not None for row in scalars)
    # AdamW keeps exp_avg, exp_avg_sq and step for each of the 3 parameters.
    assert scalars[4]["optimizer_state_tensors"] == 9
    loads = [(row["segment"], json.loads(row["detail"])["object"])
             for row in read_table(run_dir, "events") if row["kind"] == "checkpoint_load"]
    assert loads == [(1, "model"), (1, "optimizer")]


def test_open_recorder_ranks(tmp_path: Path) -> None:
    from runlens.integrations import open_recorder

    assert open_recorder(tmp_path / "run", {}, rank=1, all_ranks=False) is None
    assert not (tmp_path / "run").exists()
    with open_recorder(tmp_path / "run", {}, rank=1, all_ranks=True) as recorder:
        recorder.step(1.0)
    assert [path.parent.name for path in part_files(tmp_path / "run", "scalars")] == ["rank-1"]


# -- packaging -------------------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)


def test_runlens_import_skips_frameworks() -> None:
    result = run_python(
        "import sys, runlens, runlens.cli, runlens.integrations\n"
        "loaded = sorted(name for name in ('lightning', 'pytorch_lightning', 'transformers',"
        " 'torch') if name in sys.modules)\n"
        "print(loaded)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module, blocked, extra", [
    ("runlens.integrations.lightning", ("lightning", "pytorch_lightning"), "lightning"),
    ("runlens.integrations.transformers", ("transformers",), "transformers"),
])
def test_missing_framework_names_package(module: str, blocked: tuple[str, ...],
                                         extra: str) -> None:
    # A None entry in sys.modules makes `import` fail as for a package that is absent.
    result = run_python(
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        f"import {module}\n")
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ModuleNotFoundError: ")
    assert f"pip install 'runlens[{extra}]'" in last_line
