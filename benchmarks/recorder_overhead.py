"""Measure the recorder's overhead on the step time of small CPU training loops.

Each model trains the same number of steps with and without `runlens.record` at its
default settings; the two are interleaved over several rounds and the median of each
is compared, so slow drift of the machine affects both alike.

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
    print("| model | step time without | step time with | overhead |")
    print("| --- | --- | --- | --- |")
    for name, make_model in MODELS.items():
        time_steps(make_model, 20, record=True)  # warm-up of both paths
        without, with_recorder = [], []
        for _ in range(args.rounds):
            without.append(time_steps(make_model, args.steps, record=False))
            with_recorder.append(time_steps(make_model, args.steps, record=True))
        base, recorded = statistics.median(without), statistics.median(with_recorder)
        print(f"| {name} | {base * 1e3:.2f} ms | {recorded * 1e3:.2f} ms | "
              f"{(recorded / base - 1) * 100:+.1f}% |")


if __name__ == "__main__":
    main()
