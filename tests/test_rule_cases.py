"""Branches of built-in rules that no sample run covers, on small fresh recordings.

Each case trains a real model with the recorder on and checks one rule's finding, or
its silence, from the recorded run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import runlens
from runlens.analyze import Run, evaluate, load_rules
from recorder_helpers import make_model, task_losses, total_loss


@pytest.fixture(scope="module")
def rules():
    return load_rules()


def _findings(run_dir: Path, rules, rule_id: str) -> list:
    with Run.open(run_dir) as run:
        report = evaluate(run, [rule for rule in rules if rule.id == rule_id])
    assert report.errored == []
    assert report.not_evaluated == []
    return report.findings


def _train_adam(run_dir: Path, steps: int, between_steps) -> None:
    """Train with Adam and statistics every 10 steps, calling `between_steps(step, rec,
    model, optimizer)` before each step's forward pass."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with runlens.record(run_dir, model=model, optimizer=optimizer, param_stats_every=10,
                        strict=True) as rec:
        for step in range(steps):
            between_steps(step, rec, model, optimizer)
            optimizer.zero_grad()
            loss = total_loss(model, step)
            loss.backward()
            optimizer.step()
            rec.step(loss)


def _clear_state_at(step_to_clear: int, decision: str | None = None):
    def between_steps(step, rec, model, optimizer):
        if step == step_to_clear:
            optimizer.state.clear()
            if decision is not None:
                rec.event(decision)
    return between_steps


def test_stale_state_cleared_mid_run(tmp_path, rules):
    _train_adam(tmp_path, 100, _clear_state_at(55))
    (finding,) = _findings(tmp_path, rules, "stale-optimizer-state")
    assert (finding.step_start, finding.step_end) == (50, 60)
    assert "state dropped for 8 parameters" in finding.message
    assert "went down from 51 to 6" in finding.message


def test_stale_state_reset_by_decision(tmp_path, rules):
    _train_adam(tmp_path, 100, _clear_state_at(55, decision="optimizer_state_reset"))
    assert _findings(tmp_path, rules, "stale-optimizer-state") == []


def _pause_backbone(start: int, end: int, decision: str | None = None):
    def between_steps(step, rec, model, optimizer):
        if step in (start, end):
            model.backbone.requires_grad_(step == end)
        if step == end and decision is not None:
            rec.event(decision)
    return between_steps


def test_stale_state_kept_after_pause(tmp_path, rules):
    _train_adam(tmp_path, 200, _pause_backbone(40, 140))
    (finding,) = _findings(tmp_path, rules, "stale-optimizer-state")
    assert "state kept for 4 parameters" in finding.message
    assert "freeze at step 40, unfreeze at step 140" in finding.message


def test_stale_state_kept_by_decision(tmp_path, rules):
    _train_adam(tmp_path, 200, _pause_backbone(40, 140, decision="optimizer_state_kept"))
    assert _findings(tmp_path, rules, "stale-optimizer-state") == []


def test_stale_state_short_pause_ignored(tmp_path, rules):
    _train_adam(tmp_path, 120, _pause_backbone(40, 70))
    assert _findings(tmp_path, rules, "stale-optimizer-state") == []


def test_stale_state_fresh_at_unfreeze(tmp_path, rules):
    pause = _pause_backbone(40, 140)

    def drop_state_when_unfreezing(step, rec, model, optimizer):
        pause(step, rec, model, optimizer)
        if step == 140:
            for param in model.backbone.parameters():
                optimizer.state.pop(param, None)

    _train_adam(tmp_path, 200, drop_state_when_unfreezing)
    assert _findings(tmp_path, rules, "stale-optimizer-state") == []


def test_stale_state_heads_in_turn_ignored(tmp_path, rules):
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, param_stats_every=100,
                        strict=True) as rec:
        for step in range(400):
            optimizer.zero_grad()
            losses = task_losses(model, step)
            loss = losses["a"] if step % 4 else losses["b"]
            loss.backward()
            optimizer.step()
            rec.step(loss)
    assert _findings(tmp_path, rules, "stale-optimizer-state") == []


def test_frozen_param_cleared_grads_silent(tmp_path, rules):
    _train_adam(tmp_path, 100, _pause_backbone(30, 1000))
    assert _findings(tmp_path, rules, "frozen-param-moved") == []


def test_frozen_param_adam_zero_grads_moves(tmp_path, rules):
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, param_stats_every=10,
                        strict=True) as rec:
        for step in range(60):
            if step == 30:
                model.head_b.requires_grad_(False)
            optimizer.zero_grad(set_to_none=False)
            loss = total_loss(model, step)
            loss.backward()
            optimizer.step()
            rec.step(loss)
    (finding,) = _findings(tmp_path, rules, "frozen-param-moved")
    assert (finding.step_start, finding.step_end) == (30, 50)
    assert "2 parameters with requires_grad=False" in finding.message
    assert "(head_b.bias, head_b.weight)" in finding.message


def _train_fp16_with_small_task(run_dir: Path, scaler) -> None:
    """Train two heads under fp16 autocast, one of them on a loss 1e-5 times the other."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with runlens.record(run_dir, model=model, optimizer=optimizer, scaler=scaler,
                        param_stats_every=10, strict=True) as rec:
        for step in range(40):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                losses = task_losses(model, step)
            losses = {"a": losses["a"].float(), "b": 1e-5 * losses["b"].float()}
            loss = losses["a"] + losses["b"]
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            rec.step(loss, losses=losses)


def test_amp_gradient_underflow_reports_small_loss_without_scaler(tmp_path, rules):
    _train_fp16_with_small_task(tmp_path, scaler=None)
    (finding,) = _findings(tmp_path, rules, "amp-gradient-underflow")
    assert finding.message.startswith("Under fp16, task b: its median loss")


def test_amp_gradient_underflow_trusts_a_working_scaler(tmp_path, rules):
    _train_fp16_with_small_task(tmp_path, scaler=torch.amp.GradScaler("cpu"))
    assert _findings(tmp_path, rules, "amp-gradient-underflow") == []
