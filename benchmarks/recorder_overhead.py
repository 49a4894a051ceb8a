"""Measure the recorder's overhead on the step time of small CPU training loops.

Each model trains the same number of steps with and without `runlens.record` at its
default settings; the two are interleaved over several rounds and the median of each
is compared, so slow drift of the machine affects both alike. On a shared two-core
machine that wall-clock difference is noisy, so the time spent inside the recorder's
own code (its optimizer hooks, the clipping wrapper and `Recorder.step`) is also
measured directly with a timer around each of them, and around the activation probe's
statistics-step work.

    python benchmarks/recorder_overhead.py [--steps 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import runlens
from runlens.recorder import activation_probe, clipping_probe, optimizer_probe, recorder


class RecorderTimer:
    """Adds up the seconds spent in the recorder's per-step entry points."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._originals = []

    def wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        self._originals.append((owner, name, original))
        setattr(owner, name, timed)

    def __enter__(self) -> "RecorderTimer":
        self.wrap(recorder.Recorder, "step")
        self.wrap(optimizer_probe.OptimizerProbe, "_before_step")
        self.wrap(optimizer_probe.OptimizerProbe, "_after_step")
        self.wrap(clipping_probe.ClippingProbe, "log")
        # The forward hooks return after a few attribute checks on other steps; only
        # their statistics-step work is timed here.
        self.wrap(activation_probe.ActivationProbe, "_record_activation")
        self.wrap(activation_probe.ActivationProbe, "_record_batchnorm")
        return self

    def __exit__(self, *exc_info) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)


def mlp() -> tuple[nn.Module, callable]:
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 10))

    def batch():
        return torch.randn(256, 256), torch.randint(0, 10, (256,))
    return model, batch


def cnn() -> tuple[nn.Module, callable]:
    def block(channels_in, channels_out):
        return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=1),
                             nn.BatchNorm2d(channels_out), nn.ReLU(), nn.MaxPool2d(2))
    model = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.Flatten(),
                          nn.Linear(128 * 4 * 4, 10))

    def batch():
        return torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    return model, batch


MODELS = {"mlp-2.3M": mlp, "cnn-0.1M": cnn}


def time_steps(make_model, steps: int, record: bool) -> float:
    """Return the mean seconds per optimizer step over `steps` steps."""
    torch.manual_seed(0)
    model, batch = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [batch() for _ in range(8)]
    with tempfile.TemporaryDirectory() as run_dir:
        recorder = runlens.record(run_dir, model=model, optimizer=optimizer) if record else None
        start = time.perf_counter()
        for step in range(steps):
            inputs, labels = batches[step % len(batches)]
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if recorder is not None:
                recorder.step(loss)
        elapsed = time.perf_counter() - start
        if recorder is not None:
            recorder.close()
    return elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps x {args.rounds} rounds")
    print("| model | step time without | step time with | wall-clock difference "
          "| time in recorder code |")
    print("| --- | --- | --- | --- | --- |")
    for name, make_model in MODELS.items():
        time_steps(make_model, 20, record=True)  # warm-up of both paths
        without, with_recorder = [], []
        for round_index in range(args.rounds):
            # Alternate which variant goes first, so drift within a round cancels out.
            for record in ((False, True) if round_index % 2 == 0 else (True, False)):
                seconds = time_steps(make_model, args.steps, record=record)
                (with_recorder if record else without).append(seconds)
        base, recorded = statistics.median(without), statistics.median(with_recorder)
        with RecorderTimer() as timer:
            timed_step = time_steps(make_model, args.steps, record=True)
        inside = timer.seconds / args.steps
        print(f"| {name} | {base * 1e3:.2f} ms | {recorded * 1e3:.2f} ms | "
              f"{(recorded / base - 1) * 100:+.1f}% | {inside * 1e3:.3f} ms "
              f"({inside / timed_step * 100:.1f}%) |")


if __name__ == "__main__":
    main()
