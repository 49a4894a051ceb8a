"""Record the sample runs: one per failure mode, plus healthy runs, from real CPU training.

Each failure scenario trains a small model on synthetic data with one fault really
induced, which its docstring describes: a clip norm far below the gradient norm, a class that
becomes rare, a resume without the optimizer state, and so on. Seeds, a single thread
and a fake clock make the recorded values the same on every run of the script.

    python sample_runs/generate.py              # all scenarios into sample_runs/
    python sample_runs/generate.py --out DIR    # elsewhere
    python sample_runs/generate.py NAME ...     # only the named scenarios

Tests import `SCENARIOS` and record fresh runs with the same code.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import runlens

HERE = Path(__file__).resolve().parent
FEATURES = 16


class FakeClock:
    """A clock that advances 10 ms per reading, so recorded times are reproducible."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:
        self._ticks = itertools.count()
        self._start = start

    def __call__(self) -> float:
        return self._start + 0.01 * next(self._ticks)


def _options(**overrides) -> dict:
    options = {"param_stats_every": 10, "task_probe_every": 5, "flush_every": 100,
               "flush_seconds": 1e9, "clock": FakeClock()}
    options.update(overrides)
    return options


def _adamw(model: nn.Module, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """Build AdamW with weight decay on matrices only, not on biases or norm gains."""
    matrices = [param for param in model.parameters() if param.dim() >= 2]
    vectors = [param for param in model.parameters() if param.dim() < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay},
                              {"params": vectors, "weight_decay": 0.0}], lr=lr)


def _warmup_cosine(steps: int, warmup: int):
    """Return a scheduler factory: linear warmup from 1% over `warmup` steps, then cosine."""
    def schedule(optimizer):
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [
            torch.optim.lr_scheduler.LinearLR(optimizer, 0.01, 1.0, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps - warmup),
        ], milestones=[warmup])
    return schedule


def _seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    return torch.Generator().manual_seed(seed)


def _classifier(classes: int, hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.LayerNorm(hidden),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class Blobs:
    """Gaussian class clusters in FEATURES dimensions that overlap, so class priors matter."""

    def __init__(self, classes: int, generator: torch.Generator, spread: float = 1.6) -> None:
        self.centers = torch.randn(classes, FEATURES, generator=generator) * 1.2
        self.spread = spread
        self.generator = generator
        self.classes = classes

    def sample(self, size: int, weights: torch.Tensor | None = None):
        if weights is None:
            weights = torch.ones(self.classes)
        labels = torch.multinomial(weights, size, replacement=True, generator=self.generator)
        noise = torch.randn(size, FEATURES, generator=self.generator) * self.spread
        return self.centers[labels] + noise, labels


def _train_classifier(run_dir: Path, *, steps: int, seed: int, make_optimizer,
                      make_scheduler=None, clip: float | None = None, classes: int = 4,
                      class_weights: Callable[[int], torch.Tensor | None] = lambda step: None,
                      eval_every: int = 50, config: dict | None = None,
                      alter_batch=None, loss_fn=F.cross_entropy, train_size: int | None = None,
                      hidden: int = 32, make_model=None, micro_batch_size: int | None = None,
                      spread: float = 1.6, autocast_dtype: torch.dtype | None = None) -> None:
    """Train a classifier on blobs with the recorder on; the common loop of most scenarios.

    `alter_batch(step, inputs, labels)` returns the batch that is really trained on, to
    induce data faults. `train_size` trains on a fixed set of that many examples.
    `make_model()` replaces the default classifier. `micro_batch_size` splits each batch
    of 64 into micro-batches whose gradients accumulate into one optimizer step.
    `autocast_dtype` runs the forward pass under CPU autocast in that dtype.
    """
    generator = _seed(seed)
    data = Blobs(classes, generator, spread=spread)
    validation = data.sample(2000)
    fixed_set = data.sample(train_size) if train_size else None
    model = make_model() if make_model else _classifier(classes, hidden)
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    train_targets, train_predictions = [], []
    with runlens.record(run_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                        config=config or {}, **_options()) as rec:
        for step in range(steps):
            if fixed_set is None:
                inputs, labels = data.sample(64, class_weights(step))
            else:
                chosen = torch.randint(0, train_size, (64,), generator=generator)
                inputs, labels = fixed_set[0][chosen], fixed_set[1][chosen]
            if alter_batch is not None:
                inputs, labels = alter_batch(step, inputs, labels)
            optimizer.zero_grad(set_to_none=True)
            chunk = micro_batch_size or len(labels)
            chunks = list(zip(inputs.split(chunk), labels.split(chunk)))
            outputs, loss = [], 0.0
            for chunk_inputs, chunk_labels in chunks:
                with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                                    enabled=autocast_dtype is not None):
                    chunk_logits = model(chunk_inputs)
                chunk_loss = loss_fn(chunk_logits.float(), chunk_labels) / len(chunks)
                chunk_loss.backward()
                outputs.append(chunk_logits.detach())
                loss = loss + chunk_loss.detach()
            logits = torch.cat(outputs)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            rec.step(loss)
            train_targets.append(labels)
            train_predictions.append(logits.detach().argmax(-1))
            if (step + 1) % eval_every == 0:
                _evaluate(rec, model, validation, classes)
                rec.log_classes("train", torch.cat(train_targets), torch.cat(train_predictions),
                                num_classes=classes)
                train_targets, train_predictions = [], []


def _evaluate(rec, model: nn.Module, validation, classes: int) -> None:
    inputs, labels = validation
    model.eval()
    with torch.no_grad():
        logits = model(inputs)
    model.train()
    rec.log_eval("val", {"loss": F.cross_entropy(logits, labels),
                         "accuracy": (logits.argmax(-1) == labels).float().mean()})
    rec.log_classes("val", labels, logits, num_classes=classes)


# -- failure scenarios --------------------------------------------------------------------

def clipping_every_step(run_dir: Path, seed: int = 1) -> None:
    """SGD with a learning rate 20x too high, kept stable only by a clip norm of 0.05.

    The gradient norm of this model sits near 1, so every step is clipped.
    """
    _train_classifier(
        run_dir, steps=400, seed=seed, clip=0.05,
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=2.0, momentum=0.9),
        config={"scenario": "clipping-every-step"})


def rare_class_collapse(run_dir: Path, seed: int = 2) -> None:
    """Class 3 falls to 0.5% of training batches at step 300, and its recall collapses.

    The training loss keeps falling because the remaining classes are easier.
    """
    def class_weights(step: int) -> torch.Tensor:
        if step < 300:
            return torch.ones(4)
        return torch.tensor([1.0, 1.0, 1.0, 0.005])

    _train_classifier(
        run_dir, steps=800, seed=seed, class_weights=class_weights,
        make_optimizer=lambda model: _adamw(model, lr=3e-3),
        config={"scenario": "rare-class-collapse"})


def schedule_boundary_spike(run_dir: Path, seed: int = 3) -> None:
    """Train with a hand-written restart that jumps Adam's learning rate 100x at step 300."""
    def factor(step: int) -> float:
        return 1.0 if step < 300 else 100.0

    _train_classifier(
        run_dir, steps=450, seed=seed,
        make_optimizer=lambda model: torch.optim.Adam(model.parameters(), lr=1e-3),
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor),
        config={"scenario": "schedule-boundary-spike"})


def optimizer_state_mismatch(run_dir: Path, seed: int = 4) -> None:
    """Resume from a checkpoint that restores the weights but builds a fresh Adam.

    The first segment trains 300 steps and saves model and optimizer state. The second
    segment loads the weights only, so Adam's moments and step count restart at step 300.
    """
    _train_and_resume(run_dir, seed, restore_optimizer=False,
                      scenario="optimizer-state-mismatch")


def _train_and_resume(run_dir: Path, seed: int, *, restore_optimizer: bool,
                      scenario: str) -> None:
    generator = _seed(seed)
    data = Blobs(4, generator)
    validation = data.sample(2000)

    def build():
        model = _classifier(4)
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-3, betas=(0.9, 0.999))
        return model, optimizer

    def train(rec, model, optimizer, steps: range) -> None:
        for step in steps:
            inputs, labels = data.sample(64)
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rec.step(loss)
            if (step + 1) % 50 == 0:
                _evaluate(rec, model, validation, 4)

    model, optimizer = build()
    options = _options()
    config = {"scenario": scenario}
    with runlens.record(run_dir, model=model, optimizer=optimizer, config=config,
                        **options) as rec:
        train(rec, model, optimizer, range(0, 300))
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    model, optimizer = build()
    with runlens.record(run_dir, model=model, optimizer=optimizer, config=config,
                        **options) as rec:
        model.load_state_dict(checkpoint["model"])
        if restore_optimizer:
            optimizer.load_state_dict(checkpoint["optimizer"])
        train(rec, model, optimizer, range(300, 500))


def task_gradient_imbalance(run_dir: Path, seed: int = 5) -> None:
    """Train a regression task weighted 50x beside a classification task on a shared backbone."""
    _train_two_tasks(run_dir, seed, regression_weight=50.0, target_scale=10.0,
                     scenario="task-gradient-imbalance")


class TwoTaskModel(nn.Module):
    def __init__(self, classes: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(),
                                      nn.Linear(hidden, hidden), nn.ReLU())
        self.classify = nn.Linear(hidden, classes)
        self.regress = nn.Linear(hidden, 1)

    def forward(self, inputs):
        features = self.backbone(inputs)
        return self.classify(features), self.regress(features).squeeze(-1)


def _train_two_tasks(run_dir: Path, seed: int, *, regression_weight: float,
                     target_scale: float, scenario: str, steps: int = 400) -> None:
    generator = _seed(seed)
    data = Blobs(4, generator)
    direction = torch.randn(FEATURES, generator=generator) / FEATURES ** 0.5
    model = TwoTaskModel()
    optimizer = _adamw(model, lr=2e-3)
    weights = {"classification": 1.0, "regression": regression_weight}
    with runlens.record(run_dir, model=model, optimizer=optimizer,
                        shared_params=model.backbone, config={"scenario": scenario},
                        **_options()) as rec:
        for step in range(steps):
            inputs, labels = data.sample(64)
            targets = target_scale * (inputs @ direction + 0.3 * labels.float())
            logits, predictions = model(inputs)
            losses = {"classification": F.cross_entropy(logits, labels),
                      "regression": F.mse_loss(predictions, targets)}
            rec.probe_tasks(losses, weights)
            total = sum(weights[task] * loss for task, loss in losses.items())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            rec.step(total, losses=losses, loss_weights=weights)


def non_finite_values(run_dir: Path, seed: int = 6) -> None:
    """Standardize each batch by its own std, and feed a dead sensor from step 200.

    From step 200 feature 0 is constant, so its batch std is zero, 0/0 gives NaN inputs,
    and the loss, the gradients and then every weight become NaN.
    """
    def standardized(step, inputs, labels):
        if step >= 200:
            inputs = inputs.clone()
            inputs[:, 0] = 0.5
        return (inputs - inputs.mean(dim=0)) / inputs.std(dim=0), labels

    _train_classifier(
        run_dir, steps=300, seed=seed, alter_batch=standardized,
        make_optimizer=lambda model: torch.optim.Adam(model.parameters(), lr=1e-3),
        config={"scenario": "non-finite-values"})


def loss_spike(run_dir: Path, seed: int = 7) -> None:
    """Train on five batches of shuffled labels at steps 400-404, as a corrupt shard would.

    The learning rate is constant, so no schedule boundary explains the spike.
    """
    def corrupt_shard(step, inputs, labels):
        if 400 <= step < 405:
            return inputs, labels[torch.randperm(len(labels))]
        return inputs, labels

    _train_classifier(
        run_dir, steps=600, seed=seed, alter_batch=corrupt_shard,
        make_optimizer=lambda model: _adamw(model, lr=2e-3),
        config={"scenario": "loss-spike"})


def gradient_explosion(run_dir: Path, seed: int = 8) -> None:
    """Grow SGD's learning rate 2% per step from 0.01, as a range test left running would.

    The weights and gradient norm grow by orders of magnitude and the loss diverges.
    """
    _train_classifier(
        run_dir, steps=400, seed=seed,
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.01),
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.ExponentialLR(
            optimizer, 1.02),
        config={"scenario": "gradient-explosion"})


def divergence(run_dir: Path, seed: int = 17) -> None:
    """Raise SGD's learning rate linearly 40x over the second half of training.

    The schedule was meant to decay (a sign error in the lambda), so the loss climbs
    back above where it started without ever becoming NaN.
    """
    def factor(step: int) -> float:
        return 1.0 if step < 300 else 1.0 + 39.0 * (step - 300) / 300

    _train_classifier(
        run_dir, steps=600, seed=seed,
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor),
        config={"scenario": "divergence"})


def weight_decay_on_norm_or_bias(run_dir: Path, seed: int = 9) -> None:
    """Pass all parameters to AdamW with weight decay 0.1, LayerNorm and biases included."""
    _train_classifier(
        run_dir, steps=300, seed=seed,
        make_optimizer=lambda model: torch.optim.AdamW(model.parameters(), lr=3e-3,
                                                       weight_decay=0.1),
        config={"scenario": "weight-decay-on-norm-or-bias"})


def update_ratio_out_of_range(run_dir: Path, seed: int = 10) -> None:
    """Give the first layer its own param group with lr 1e-8, a mistyped multiplier."""
    def optimizer(model):
        first = list(model[0].parameters())
        rest = [param for module in list(model)[1:] for param in module.parameters()]
        return torch.optim.Adam([{"params": first, "lr": 1e-8}, {"params": rest}], lr=3e-3)

    _train_classifier(run_dir, steps=400, seed=seed, make_optimizer=optimizer,
                      config={"scenario": "update-ratio-out-of-range"})


def adam_with_l2(run_dir: Path, seed: int = 18) -> None:
    """Use torch.optim.Adam with weight_decay=0.01, which Adam applies as L2."""
    _train_classifier(
        run_dir, steps=300, seed=seed,
        make_optimizer=lambda model: torch.optim.Adam(
            [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.01},
             {"params": [p for p in model.parameters() if p.dim() < 2]}], lr=2e-3),
        config={"scenario": "adam-with-l2"})


def trainable_param_not_updated(run_dir: Path, seed: int = 19) -> None:
    """Build the optimizer from every layer but the output layer, which stays at its init."""
    def optimizer(model):
        layers = list(model)[:-1]
        return torch.optim.Adam([p for layer in layers for p in layer.parameters()], lr=2e-3)

    _train_classifier(run_dir, steps=300, seed=seed, make_optimizer=optimizer,
                      config={"scenario": "trainable-param-not-updated"})


def lr_schedule_unit_mismatch(run_dir: Path, seed: int = 21) -> None:
    """Step CosineAnnealingLR every batch with T_max=20, meant as 20 epochs."""
    _train_classifier(
        run_dir, steps=600, seed=seed,
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=20),
        config={"scenario": "lr-schedule-unit-mismatch"})


def loss_metric_divergence(run_dir: Path, seed: int = 22) -> None:
    """Relabel class 1 as class 2 in the training data from step 300, as a bad new source.

    The model learns the wrong mapping, so the training loss keeps falling while the
    accuracy on the correctly labelled validation set drops.
    """
    def relabel(step, inputs, labels):
        if step < 300:
            return inputs, labels
        return inputs, torch.where(labels == 1, torch.full_like(labels, 2), labels)

    _train_classifier(
        run_dir, steps=700, seed=seed, alter_batch=relabel,
        make_optimizer=lambda model: _adamw(model, lr=3e-3),
        config={"scenario": "loss-metric-divergence"})


class NormalizedEmbedding(nn.Module):
    """An embedding without bias whose output is L2-normalized by a hand-written norm.

    For an all-zero input row the embedding is zero and its norm is sqrt(0). The forward
    pass stays finite, because 0 / (0 + eps) is 0. The gradient of sqrt at zero is inf,
    though, and inf * 0 puts NaN into the embedding's weight gradient.
    """

    def __init__(self, classes: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, hidden, bias=False)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, inputs):
        features = self.embed(inputs)
        norms = torch.sqrt((features ** 2).sum(dim=-1, keepdim=True))
        return self.head(features / (norms + 1e-6))


def _train_with_scaler(run_dir: Path, *, seed: int, steps: int, scenario: str,
                       scaler_options: dict, clip: float | None = None,
                       clip_before_unscale: bool = False, alter_batch=None,
                       model: nn.Module | None = None) -> None:
    """Train a classifier on blobs with a CPU GradScaler, as an AMP loop does."""
    generator = _seed(seed)
    data = Blobs(4, generator)
    model = model() if model is not None else _classifier(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler("cpu", **scaler_options)
    with runlens.record(run_dir, model=model, optimizer=optimizer, scaler=scaler,
                        config={"scenario": scenario}, **_options()) as rec:
        for step in range(steps):
            inputs, labels = data.sample(64)
            if alter_batch is not None:
                inputs, labels = alter_batch(step, inputs, labels)
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if clip is not None and clip_before_unscale:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            elif clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
            rec.step(loss)


def amp_skipped_steps(run_dir: Path, seed: int = 23) -> None:
    """Pad every fifth batch with a zero row before a hand-written L2 normalization.

    The zero row gives NaN weight gradients from a finite loss (see
    `NormalizedEmbedding`), so the GradScaler skips a fifth of the steps and halves its
    scale at each skip, faster than it grows it back, until the scale nears zero.
    """
    def pad(step, inputs, labels):
        if step % 5 == 0:
            inputs = torch.cat([inputs[:-1], torch.zeros_like(inputs[-1:])])
        return inputs, labels

    _train_with_scaler(run_dir, seed=seed, steps=400, scenario="amp-skipped-steps",
                       scaler_options={"init_scale": 2.0 ** 16, "growth_interval": 20},
                       alter_batch=pad, model=NormalizedEmbedding)


def clip_before_unscale(run_dir: Path, seed: int = 24) -> None:
    """Clip at 1.0 right after scaler.scale(loss).backward(), before scaler.unscale_.

    The clip measures gradients multiplied by the loss scale (2**10 and growing), so it
    clips every step to a norm that means 1/scale after unscaling.
    """
    _train_with_scaler(run_dir, seed=seed, steps=400, scenario="clip-before-unscale",
                       scaler_options={"init_scale": 2.0 ** 10, "growth_interval": 100},
                       clip=1.0, clip_before_unscale=True)


def healthy_amp_clipping(run_dir: Path, seed: int = 25) -> None:
    """Train with a CPU GradScaler, unscale_ before clipping at 1.0, as the AMP docs show."""
    _train_with_scaler(run_dir, seed=seed, steps=400, scenario="healthy",
                       scaler_options={"init_scale": 2.0 ** 10, "growth_interval": 100},
                       clip=1.0)


class Scenes:
    """Examples grouped in scenes: each scene shifts its examples by its own offset.

    Examples of one scene are correlated, as frames of one drive are.
    """

    def __init__(self, generator: torch.Generator, scenes: int = 40, per_scene: int = 250,
                 classes: int = 4) -> None:
        blobs = Blobs(classes, generator)
        offsets = torch.randn(scenes, FEATURES, generator=generator) * 0.3
        inputs, labels = blobs.sample(scenes * per_scene)
        self.scene = torch.arange(scenes).repeat_interleave(per_scene)
        self.inputs = inputs + offsets[self.scene]
        self.labels = labels
        self.scenes = scenes

    def names(self, indices: torch.Tensor) -> list[str]:
        return [f"scene-{int(scene):03d}" for scene in self.scene[indices]]


def _train_grouped(run_dir: Path, *, seed: int, scenario: str, steps: int = 400,
                   split_by_scene: bool = True, scenes_per_batch: int | None = None,
                   accumulation: Callable[[int], int] = lambda step: 1) -> None:
    """Train on scene-grouped data, logging batch composition and split membership.

    `split_by_scene` assigns whole scenes to the validation split; otherwise examples are
    split at random. `scenes_per_batch` draws each batch from that many scenes, as a
    loader reading shards in order does. `accumulation(step)` is the number of 16-example
    micro-batches per optimizer step.
    """
    generator = _seed(seed)
    data = Scenes(generator)
    if split_by_scene:
        validation_mask = data.scene < data.scenes // 5
    else:
        validation_mask = torch.rand(len(data.scene), generator=generator) < 0.2
    train_indices = torch.nonzero(~validation_mask).squeeze(1)
    validation_indices = torch.nonzero(validation_mask).squeeze(1)
    model = _classifier(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    with runlens.record(run_dir, model=model, optimizer=optimizer,
                        config={"scenario": scenario}, **_options()) as rec:
        rec.log_split_groups("train", data.names(train_indices))
        rec.log_split_groups("val", data.names(validation_indices))
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            micro_batches = accumulation(step)
            total = 0.0
            for _ in range(micro_batches):
                chosen = _draw(train_indices, data, scenes_per_batch, generator)
                loss = F.cross_entropy(model(data.inputs[chosen]), data.labels[chosen])
                (loss / micro_batches).backward()
                total += loss.detach() / micro_batches
                rec.log_batch(groups=data.names(chosen))
            optimizer.step()
            rec.step(total)
            if (step + 1) % 50 == 0:
                _evaluate(rec, model, (data.inputs[validation_indices],
                                       data.labels[validation_indices]), 4)


def _draw(train_indices: torch.Tensor, data: Scenes, scenes_per_batch: int | None,
          generator: torch.Generator, size: int = 16) -> torch.Tensor:
    if scenes_per_batch is None:
        return train_indices[torch.randint(0, len(train_indices), (size,), generator=generator)]
    train_scenes = torch.unique(data.scene[train_indices])
    picked = train_scenes[torch.randperm(len(train_scenes), generator=generator)[:scenes_per_batch]]
    pool = train_indices[torch.isin(data.scene[train_indices], picked)]
    return pool[torch.randint(0, len(pool), (size,), generator=generator)]


def validation_leakage(run_dir: Path, seed: int = 26) -> None:
    """Split examples, not scenes, at random: every validation scene is also trained on."""
    _train_grouped(run_dir, seed=seed, scenario="validation-leakage", split_by_scene=False)


def correlated_batches(run_dir: Path, seed: int = 27) -> None:
    """Draw each 4x16-example batch from 2 scenes, as a loader reading shards in order does."""
    _train_grouped(run_dir, seed=seed, scenario="correlated-batches", scenes_per_batch=2,
                   accumulation=lambda step: 4)


def lr_not_scaled_with_batch(run_dir: Path, seed: int = 28) -> None:
    """Raise gradient accumulation from 1 to 4 micro-batches at step 200, keeping the lr."""
    _train_grouped(run_dir, seed=seed, scenario="lr-not-scaled-with-batch",
                   accumulation=lambda step: 1 if step < 200 else 4)


def healthy_grouped_data(run_dir: Path, seed: int = 29) -> None:
    """Split by scene and draw batches across all training scenes, 4 micro-batches each."""
    _train_grouped(run_dir, seed=seed, scenario="healthy", accumulation=lambda step: 4)


def _mlp(activation: type[nn.Module] = nn.ReLU, batchnorm: bool = False,
         first_bias: float | None = None, classes: int = 4, hidden: int = 64) -> nn.Module:
    """Build a two-hidden-layer MLP with the given activation, optional BatchNorm."""
    def norm() -> list[nn.Module]:
        return [nn.BatchNorm1d(hidden)] if batchnorm else []

    # A bias right before BatchNorm gets no gradient (BatchNorm subtracts the mean), so
    # those layers have none.
    model = nn.Sequential(nn.Linear(FEATURES, hidden, bias=not batchnorm), *norm(), activation(),
                          nn.Linear(hidden, hidden, bias=not batchnorm), *norm(), activation(),
                          nn.Linear(hidden, classes))
    if first_bias is not None:
        nn.init.constant_(model[0].bias, first_bias)
    return model


def dead_activations(run_dir: Path, seed: int = 30) -> None:
    """Initialize the first layer's bias at -8, so the first ReLUs output zero from the start.

    A ReLU with negative input passes no gradient, so those units never recover.
    """
    _train_classifier(
        run_dir, steps=300, seed=seed, make_model=lambda: _mlp(first_bias=-8.0),
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        config={"scenario": "dead-activations"})


def saturated_activations(run_dir: Path, seed: int = 31) -> None:
    """Feed unnormalized inputs, 20x their usual scale, into a tanh MLP."""
    def unnormalized(step, inputs, labels):
        return inputs * 20.0, labels

    _train_classifier(
        run_dir, steps=300, seed=seed, alter_batch=unnormalized,
        make_model=lambda: _mlp(activation=nn.Tanh),
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        config={"scenario": "saturated-activations"})


def batchnorm_small_batch(run_dir: Path, seed: int = 33) -> None:
    """Run BatchNorm over micro-batches of 4, accumulating 16 of them per step."""
    _train_classifier(
        run_dir, steps=300, seed=seed, micro_batch_size=4,
        make_model=lambda: _mlp(batchnorm=True),
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        config={"scenario": "batchnorm-small-batch"})


def batchnorm_stats_explode(run_dir: Path, seed: int = 34) -> None:
    """Switch a sensor to other units at step 150: inputs arrive 1000x larger."""
    def new_units(step, inputs, labels):
        return (inputs * 1000.0 if step >= 150 else inputs), labels

    _train_classifier(
        run_dir, steps=300, seed=seed, alter_batch=new_units,
        make_model=lambda: _mlp(batchnorm=True),
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        config={"scenario": "batchnorm-stats-explode"})


def healthy_batchnorm_mlp(run_dir: Path, seed: int = 35) -> None:
    """Train a BatchNorm MLP with batches of 64 and SGD with momentum, step decay at 300."""
    _train_classifier(
        run_dir, steps=400, seed=seed, make_model=lambda: _mlp(batchnorm=True),
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 300, 0.1),
        config={"scenario": "healthy"})


def healthy_tanh_mlp(run_dir: Path, seed: int = 36) -> None:
    """Train a tanh MLP on normalized inputs with SGD and momentum, cosine decay."""
    _train_classifier(
        run_dir, steps=400, seed=seed, make_model=lambda: _mlp(activation=nn.Tanh),
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9),
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=400),
        config={"scenario": "healthy"})


def healthy_plain_sgd_cosine(run_dir: Path, seed: int = 37) -> None:
    """Train with plain SGD (no momentum) and cosine decay from the first step."""
    _train_classifier(
        run_dir, steps=500, seed=seed,
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.2),
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=500),
        config={"scenario": "healthy"})


def healthy_bf16_autocast(run_dir: Path, seed: int = 38) -> None:
    """Train AdamW with the forward pass under bf16 autocast and warmup then cosine."""
    _train_classifier(
        run_dir, steps=500, seed=seed, autocast_dtype=torch.bfloat16, clip=1.0,
        make_scheduler=_warmup_cosine(500, 50), make_optimizer=lambda model: _adamw(model, lr=3e-3),
        config={"scenario": "healthy"})


def clipping_never_fires(run_dir: Path, seed: int = 15) -> None:
    """Clip at max_norm=1000, far above any gradient norm of this model."""
    _train_classifier(
        run_dir, steps=300, seed=seed, clip=1000.0,
        make_optimizer=lambda model: torch.optim.Adam(model.parameters(), lr=2e-3),
        config={"scenario": "clipping-never-fires"})


def overfitting(run_dir: Path, seed: int = 16) -> None:
    """Train a wide network on 60 fixed examples for 1500 steps: it memorizes them."""
    _train_classifier(
        run_dir, steps=1500, seed=seed, train_size=60, hidden=256, eval_every=50,
        make_optimizer=lambda model: torch.optim.Adam(model.parameters(), lr=3e-4),
        config={"scenario": "overfitting"})


DEPTH_OUTPUTS = 4096


class DepthAndClassModel(nn.Module):
    """A dense head of DEPTH_OUTPUTS values after a ReLU layer, and a linear 4-class head."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.depth = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(),
                                   nn.Linear(hidden, DEPTH_OUTPUTS))
        self.classify = nn.Linear(FEATURES, 4)

    def forward(self, inputs):
        return self.depth(inputs), self.classify(inputs)


def amp_gradient_underflow(run_dir: Path, seed: int = 50) -> None:
    """Predict a 4096-value depth map in kilometers under fp16 autocast with no GradScaler.

    Depths near 0.01 km averaged over 64 x 4096 values give each output a gradient of
    about 8e-6 times its error, and as the error shrinks more of it falls below fp16's
    smallest subnormal (6e-8) and rounds to zero. The depth loss sits more than three
    orders of magnitude below the loss of a class head trained beside it.
    """
    generator = _seed(seed)
    basis = torch.randn(FEATURES, DEPTH_OUTPUTS, generator=generator) / FEATURES ** 0.5
    class_basis = torch.randn(FEATURES, 4, generator=generator)
    model = DepthAndClassModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with runlens.record(run_dir, model=model, optimizer=optimizer,
                        config={"scenario": "amp-gradient-underflow"}, **_options()) as rec:
        for step in range(800):
            inputs = torch.randn(64, FEATURES, generator=generator)
            depth_km = 0.01 * (inputs @ basis)
            labels = (inputs @ class_basis).argmax(-1)
            with torch.autocast("cpu", dtype=torch.float16):
                depth, logits = model(inputs)
            losses = {"depth": F.mse_loss(depth.float(), depth_km),
                      "classification": F.cross_entropy(logits.float(), labels)}
            total = losses["depth"] + losses["classification"]
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            rec.step(total, losses=losses)


def _train_with_frozen_layer(run_dir: Path, *, seed: int, steps: int, frozen: range,
                             make_optimizer, set_to_none: bool, scenario: str) -> None:
    """Train a classifier whose first layer is frozen (requires_grad=False) over `frozen`.

    `set_to_none=False` makes `zero_grad` keep zero gradient tensors, as loops written
    for gradient accumulation often do.
    """
    generator = _seed(seed)
    data = Blobs(4, generator)
    validation = data.sample(2000)
    model = _classifier(4)
    first_layer = model[0]
    optimizer = make_optimizer(model)
    with runlens.record(run_dir, model=model, optimizer=optimizer,
                        config={"scenario": scenario}, **_options()) as rec:
        for step in range(steps):
            first_layer.requires_grad_(step not in frozen)
            inputs, labels = data.sample(64)
            optimizer.zero_grad(set_to_none=set_to_none)
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            optimizer.step()
            rec.step(loss)
            if (step + 1) % 50 == 0:
                _evaluate(rec, model, validation, 4)


def _sgd_with_matrix_decay(model: nn.Module) -> torch.optim.SGD:
    """Build SGD with momentum 0.9 and weight decay 1e-2 on weight matrices only."""
    matrices = [param for param in model.parameters() if param.dim() >= 2]
    vectors = [param for param in model.parameters() if param.dim() < 2]
    return torch.optim.SGD([{"params": matrices, "weight_decay": 1e-2},
                            {"params": vectors, "weight_decay": 0.0}], lr=0.02, momentum=0.9)


def frozen_param_moved(run_dir: Path, seed: int = 51) -> None:
    """Freeze the first layer from step 150 while zero_grad(set_to_none=False) keeps its
    gradients as zero tensors: SGD's momentum and weight decay go on moving it."""
    _train_with_frozen_layer(
        run_dir, seed=seed, steps=400, frozen=range(150, 400), set_to_none=False,
        make_optimizer=_sgd_with_matrix_decay,
        scenario="frozen-param-moved")


def stale_optimizer_state(run_dir: Path, seed: int = 52) -> None:
    """Freeze the first layer over steps 150-449, then unfreeze it under the same Adam,
    which resumes from moments and a step count 300 steps old."""
    _train_with_frozen_layer(
        run_dir, seed=seed, steps=600, frozen=range(150, 450), set_to_none=True,
        make_optimizer=lambda model: torch.optim.Adam(model.parameters(), lr=2e-3),
        scenario="stale-optimizer-state")


class BottleneckTwoTaskModel(nn.Module):
    """A classification head and a regression head, both linear, on a trunk of `width` features.

    The trunk ends in a linear layer of `width` units, so `width` bounds how many
    directions of the input the two heads can read between them.
    """

    def __init__(self, width: int, classes: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(),
                                      nn.Linear(hidden, width))
        self.classify = nn.Linear(width, classes)
        self.regress = nn.Linear(width, 1)

    def forward(self, inputs):
        features = self.backbone(inputs)
        return self.classify(features), self.regress(features).squeeze(-1)


def _train_reweighted_tasks(run_dir: Path, seed: int, *, width: int,
                            weights: Callable[[int], dict[str, float]], scenario: str,
                            steps: int = 600) -> None:
    """Train classification and regression on a shared trunk with loss weights `weights(step)`.

    `weights(step)` maps each task trained at that step to its loss weight, so a task
    that it leaves out is neither trained nor logged. The regression target is the
    projection of the inputs on a direction orthogonal to every class center: the trunk
    must spend a feature on it that classification has no use for.
    """
    generator = _seed(seed)
    data = Blobs(4, generator)
    centers_basis, _ = torch.linalg.qr(data.centers.T)
    direction = torch.randn(FEATURES, generator=generator)
    direction = direction - centers_basis @ (centers_basis.T @ direction)
    direction = direction / direction.norm()
    model = BottleneckTwoTaskModel(width)
    optimizer = _adamw(model, lr=3e-3)
    with runlens.record(run_dir, model=model, optimizer=optimizer,
                        shared_params=model.backbone, config={"scenario": scenario},
                        **_options()) as rec:
        for step in range(steps):
            inputs, labels = data.sample(64)
            logits, predictions = model(inputs)
            task_losses = {"classification": F.cross_entropy(logits, labels),
                           "regression": F.mse_loss(predictions, inputs @ direction)}
            step_weights = weights(step)
            losses = {task: task_losses[task] for task in step_weights}
            rec.probe_tasks(losses, step_weights)
            total = sum(step_weights[task] * loss for task, loss in losses.items())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            rec.step(total, losses=losses, loss_weights=step_weights)


def negative_transfer(run_dir: Path, seed: int = 45) -> None:
    """Raise the regression weight 10x, from 0.1 to 1.0, at step 300 on a 2-feature trunk.

    Classification uses both trunk features to separate its four classes, and the
    regression target lies in a direction that classification does not use. Once the
    regression loss has the same weight as the classification loss, the trunk turns
    toward the regression target: the regression loss falls and the classification
    loss more than doubles over the next 150 steps.
    """
    def weights(step: int) -> dict[str, float]:
        return {"classification": 1.0, "regression": 0.1 if step < 300 else 1.0}

    _train_reweighted_tasks(run_dir, seed, width=2, weights=weights,
                            scenario="negative-transfer")


def logit_explosion(run_dir: Path, seed: int = 40) -> None:
    """Pass the raw logits to F.nll_loss, which expects log-probabilities.

    Without log_softmax the loss is minus the correct class's logit, which has no lower
    bound, so Adam raises that logit step after step: the logits grow without limit while
    the training loss falls below zero.
    """
    _train_classifier(
        run_dir, steps=400, seed=seed, loss_fn=F.nll_loss,
        make_optimizer=lambda model: torch.optim.Adam(model.parameters(), lr=1e-3),
        config={"scenario": "logit-explosion"})


def missing_warmup(run_dir: Path, seed: int = 41) -> None:
    """Start Adam at its peak lr of 0.03, with no warmup, on an MLP with 256-unit layers.

    Adam's first update moves every weight element with a nonzero gradient by about the
    lr, so it changes the layers with 256 inputs by over half their norm. The loss jumps
    from 1.3 to 11.7 at step 2, and at step 10 the second ReLU layer outputs zero for 85%
    of its elements. The same run with 50 steps of linear warmup from 1% of the lr keeps
    its loss below 1.4, and that share is 39% at step 10.
    """
    _train_classifier(
        run_dir, steps=300, seed=seed, make_model=lambda: _mlp(hidden=256),
        make_optimizer=lambda model: torch.optim.Adam(model.parameters(), lr=0.03),
        config={"scenario": "missing-warmup"})


# -- healthy scenarios --------------------------------------------------------------------

def healthy_adamw_warmup_cosine(run_dir: Path, seed: int = 11) -> None:
    """Train AdamW with linear warmup then cosine decay, clipping at 1.0, balanced classes.

    Weight decay applies to weight matrices only, as it should.
    """
    _train_classifier(
        run_dir, steps=600, seed=seed, clip=1.0, make_scheduler=_warmup_cosine(600, 60),
        make_optimizer=lambda model: _adamw(model, lr=3e-3, weight_decay=0.01),
        config={"scenario": "healthy"})


def healthy_sgd_step_decay(run_dir: Path, seed: int = 12) -> None:
    """SGD with momentum and a 10x step decay at steps 200 and 400."""
    _train_classifier(
        run_dir, steps=600, seed=seed, clip=5.0,
        make_optimizer=lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        make_scheduler=lambda optimizer: torch.optim.lr_scheduler.MultiStepLR(
            optimizer, [200, 400], 0.1),
        config={"scenario": "healthy"})


def healthy_resume(run_dir: Path, seed: int = 13) -> None:
    """Resume as `optimizer_state_mismatch` does, but restore the weights and Adam's state."""
    _train_and_resume(run_dir, seed, restore_optimizer=True, scenario="healthy")


def healthy_two_tasks(run_dir: Path, seed: int = 14) -> None:
    """Classification and regression with weights that give comparable task gradients."""
    _train_two_tasks(run_dir, seed, regression_weight=1.0, target_scale=1.0,
                     scenario="healthy")


def healthy_gradual_unfreeze(run_dir: Path, seed: int = 53) -> None:
    """Train the head with the first layer frozen, then unfreeze it at step 200 under Adam.

    The frozen layer has no gradient (zero_grad sets it to None), so it neither moves
    nor gets optimizer state, and its Adam moments start fresh when it is unfrozen.
    """
    _train_with_frozen_layer(
        run_dir, seed=seed, steps=400, frozen=range(0, 200), set_to_none=True,
        make_optimizer=lambda model: torch.optim.Adam(model.parameters(), lr=2e-3),
        scenario="healthy")


def healthy_task_reweight(run_dir: Path, seed: int = 46) -> None:
    """Add regression at weight 0.1 at step 200, then raise it 10x at step 400, on 16 features.

    The weights are those of `negative_transfer`, but the regression task joins later and
    the trunk has room for both tasks. The classification loss stays level through both
    changes while the regression loss falls.
    """
    def weights(step: int) -> dict[str, float]:
        if step < 200:
            return {"classification": 1.0}
        return {"classification": 1.0, "regression": 0.1 if step < 400 else 1.0}

    _train_reweighted_tasks(run_dir, seed, width=16, weights=weights, scenario="healthy")


# -- distributed scenarios ----------------------------------------------------------------
# Each forks two ranks that join a gloo process group on 127.0.0.1. Forking, unlike
# spawning, needs no importable module, so it also works from a test that loaded this
# file by path.

def _run_two_gloo_ranks(train_rank: Callable[[int], None]) -> None:
    """Run `train_rank(rank)` in 2 forked processes joined in a gloo process group."""
    import datetime
    import socket

    import torch._dynamo  # noqa: F401 - DDP imports it; the forked ranks then share it
    import torch.distributed as dist

    def run_rank(rank: int, port: int) -> None:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2, timeout=datetime.timedelta(seconds=60))
        try:
            train_rank(rank)
        finally:
            dist.destroy_process_group()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.start_processes(run_rank, args=(port,), nprocs=2,
                                          start_method="fork")


def rank_desync(run_dir: Path, seed: int = 60) -> None:
    """Train with DDP on 2 ranks, where rank 1 re-initializes a hidden layer after the wrap.

    DDP broadcasts rank 0's parameters only when it wraps the model, and then all-reduces
    the gradients, so both ranks apply the same updates to different weights of that
    layer for the whole run.
    """
    def train_rank(rank: int) -> None:
        data = Blobs(4, _seed(seed))
        data.generator = torch.Generator().manual_seed(1000 * seed + rank)
        model = nn.parallel.DistributedDataParallel(_classifier(4))
        if rank == 1:
            torch.manual_seed(seed + 1)
            model.module[3].reset_parameters()
        optimizer = _adamw(model, lr=3e-3)
        with runlens.record(run_dir, model=model, optimizer=optimizer,
                            config={"scenario": "rank-desync"}, timer=FakeClock(0.0),
                            **_options()) as rec:
            for _ in range(100):
                inputs, labels = data.sample(64)
                loss = F.cross_entropy(model(inputs), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                rec.step(loss)

    _run_two_gloo_ranks(train_rank)


def straggler_rank(run_dir: Path, seed: int = 61) -> None:
    """Train with DDP on 2 ranks, where rank 1 sleeps 30 ms before each forward call, as a
    slow data loader would, while rank 0 waits for it in the gradient all-reduce."""
    _train_two_timed_ranks(run_dir, seed, scenario="straggler-rank", rank_1_sleep=0.03)


def healthy_ddp(run_dir: Path, seed: int = 62) -> None:
    """Train with DDP on 2 ranks that load their batches equally fast."""
    _train_two_timed_ranks(run_dir, seed, scenario="healthy", rank_1_sleep=0.0)


def _train_two_timed_ranks(run_dir: Path, seed: int, *, scenario: str,
                           rank_1_sleep: float) -> None:
    """Train a classifier with DDP on 2 gloo ranks, rank 1 sleeping before each forward.

    The timings come from a fake timer, so that they reproduce: it advances 1 ms per
    reading, and on rank 1 also by the time of each sleep.
    """
    import time

    def train_rank(rank: int) -> None:
        readings = itertools.count()
        slept = 0.0

        def timer() -> float:
            return 0.001 * next(readings) + slept

        data = Blobs(4, _seed(seed))
        data.generator = torch.Generator().manual_seed(1000 * seed + rank)
        model = nn.parallel.DistributedDataParallel(_classifier(4))
        optimizer = _adamw(model, lr=3e-3)
        with runlens.record(run_dir, model=model, optimizer=optimizer,
                            config={"scenario": scenario}, timer=timer,
                            **_options()) as rec:
            for _ in range(150):
                if rank == 1 and rank_1_sleep:
                    time.sleep(rank_1_sleep)
                    slept += rank_1_sleep
                inputs, labels = data.sample(64)
                loss = F.cross_entropy(model(inputs), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                rec.step(loss)

    _run_two_gloo_ranks(train_rank)


SCENARIOS: dict[str, Callable[[Path], None]] = {
    "clipping-every-step": clipping_every_step,
    "rare-class-collapse": rare_class_collapse,
    "schedule-boundary-spike": schedule_boundary_spike,
    "optimizer-state-mismatch": optimizer_state_mismatch,
    "task-gradient-imbalance": task_gradient_imbalance,
    "non-finite-values": non_finite_values,
    "loss-spike": loss_spike,
    "gradient-explosion": gradient_explosion,
    "divergence": divergence,
    "weight-decay-on-norm-or-bias": weight_decay_on_norm_or_bias,
    "update-ratio-out-of-range": update_ratio_out_of_range,
    "clipping-never-fires": clipping_never_fires,
    "amp-skipped-steps": amp_skipped_steps,
    "validation-leakage": validation_leakage,
    "dead-activations": dead_activations,
    "saturated-activations": saturated_activations,
    "batchnorm-small-batch": batchnorm_small_batch,
    "batchnorm-stats-explode": batchnorm_stats_explode,
    "correlated-batches": correlated_batches,
    "lr-not-scaled-with-batch": lr_not_scaled_with_batch,
    "clip-before-unscale": clip_before_unscale,
    "adam-with-l2": adam_with_l2,
    "trainable-param-not-updated": trainable_param_not_updated,
    "lr-schedule-unit-mismatch": lr_schedule_unit_mismatch,
    "loss-metric-divergence": loss_metric_divergence,
    "overfitting": overfitting,
    "amp-gradient-underflow": amp_gradient_underflow,
    "frozen-param-moved": frozen_param_moved,
    "stale-optimizer-state": stale_optimizer_state,
    "negative-transfer": negative_transfer,
    "logit-explosion": logit_explosion,
    "missing-warmup": missing_warmup,
    "rank-desync": rank_desync,
    "straggler-rank": straggler_rank,
    "healthy-adamw-warmup-cosine": healthy_adamw_warmup_cosine,
    "healthy-sgd-step-decay": healthy_sgd_step_decay,
    "healthy-resume": healthy_resume,
    "healthy-two-tasks": healthy_two_tasks,
    "healthy-amp-clipping": healthy_amp_clipping,
    "healthy-grouped-data": healthy_grouped_data,
    "healthy-batchnorm-mlp": healthy_batchnorm_mlp,
    "healthy-tanh-mlp": healthy_tanh_mlp,
    "healthy-plain-sgd-cosine": healthy_plain_sgd_cosine,
    "healthy-bf16-autocast": healthy_bf16_autocast,
    "healthy-gradual-unfreeze": healthy_gradual_unfreeze,
    "healthy-task-reweight": healthy_task_reweight,
    "healthy-ddp": healthy_ddp,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="scenarios to record (default: all)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the run directories")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    for name in args.names or SCENARIOS:
        run_dir = args.out / name
        # A run directory is append-only, so a regenerated run starts from an empty folder.
        shutil.rmtree(run_dir, ignore_errors=True)
        SCENARIOS[name](run_dir)
        print(f"recorded {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
