"""`runlens record -- python train.py`: real programs, run as subprocesses, recorded unchanged.

Each training script writes the values it computed itself (losses, norms) to a JSON file,
and the tests compare them with what the recorder wrote. The scripts that several tests
read run once per module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runlens import format as run_format
from runlens.record_command import BOOTSTRAP_DIR

RUNLENS = [sys.executable, "-m", "runlens"]
TIMEOUT = 300

# A loop with clipping and a scheduler. A second run loads the checkpoint that the first
# one saved, before its first step, and continues. The script also notes every tensor
# method that reads a value on the host (and so synchronizes with a GPU) when runlens code
# calls it during training.
PLAIN_SCRIPT = """
import json
import os
import sys

import torch
from torch import nn

STEPS = 8
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


def watch_host_reads(current_step):
    runlens = sys.modules.get("runlens")
    if runlens is None:
        return None
    reads = []
    folder = os.path.dirname(runlens.__file__)
    for name in HOST_READS:
        def guarded(self, *args, _name=name, _original=getattr(torch.Tensor, name), **kwargs):
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_code.co_filename.startswith(folder):
                    reads.append([current_step[0], _name, frame.f_code.co_filename])
                    break
                frame = frame.f_back
            return _original(self, *args, **kwargs)
        setattr(torch.Tensor, name, guarded)
    return reads


def main():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)

    first_batch = 0
    if os.path.exists("checkpoint.pt"):
        checkpoint = torch.load("checkpoint.pt")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        first_batch = checkpoint["batch"]

    reference = []
    current_step = [0]
    host_reads = watch_host_reads(current_step)
    for batch in range(first_batch, first_batch + STEPS):
        current_step[0] = batch
        generator = torch.Generator().manual_seed(batch)
        inputs = torch.randn(32, 4, generator=generator)
        targets = inputs.sum(dim=1, keepdim=True) * 3
        loss = nn.functional.mse_loss(model(inputs), targets)

        optimizer.zero_grad()
        loss.backward()
        total_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        clipped_norm = torch.linalg.vector_norm(
            torch.stack([param.grad.norm() for param in model.parameters()]))
        optimizer.step()
        scheduler.step()

        reference.append({"loss": loss.item(), "clip_total_norm": total_norm.item(),
                          "grad_norm": clipped_norm.item()})

    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "batch": first_batch + STEPS},
               "checkpoint.pt")
    with open(sys.argv[1], "w") as file:
        json.dump({"steps": reference, "host_reads": host_reads}, file)
    print(f"trained {len(reference)} steps")


main()
"""

# Gradient accumulation under a GradScaler, run with python -m: 4 backward calls per
# optimizer step, and an infinite loss on one step, which the scaler skips. Before its
# import of torch, it checks that torch is installed, as libraries do.
ACCUMULATE_SCRIPT = """
import importlib.util
import json
import sys

assert importlib.util.find_spec("torch") is not None

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
scaler = torch.amp.GradScaler("cpu")
reference = []
for step in range(6):
    optimizer.zero_grad()
    total = 0.0
    for micro_batch in range(4):
        inputs = torch.randn(8, 4)
        loss = nn.functional.mse_loss(model(inputs), inputs.sum(dim=1, keepdim=True)) / 4
        if step == 2 and micro_batch == 0:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        total += loss.item()
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    reference.append({"loss": total, "scale": scale})
with open(sys.argv[1], "w") as file:
    json.dump(reference, file)
"""

# A GAN: two optimizers. Its data comes from DataLoader workers, 2 started by fork and 1
# by spawn, and each item makes an optimizer step inside the worker, which the recorder
# must not see.
GAN_SCRIPT = """
import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class WorkerCheck(Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, index):
        layer = nn.Linear(2, 1)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        layer(torch.ones(1, 2)).sum().backward()
        optimizer.step()
        variables = any(name.startswith("RUNLENS_RECORD_") for name in os.environ)
        loaded = "runlens.recorder.auto" in sys.modules
        return torch.randn(2) + 3, torch.tensor([variables, loaded])


def main():
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    discriminator = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    generator_optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3)
    discriminator_optimizer = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
    criterion = nn.BCEWithLogitsLoss()
    reference = {"generator": [], "discriminator": [], "flags": {}}
    for context, workers in (("fork", 2), ("spawn", 1)):
        loader = DataLoader(WorkerCheck(), batch_size=8, num_workers=workers,
                            multiprocessing_context=context)
        flags = []
        for real, worker_flags in loader:
            flags += worker_flags.tolist()
            fake = generator(torch.randn(8, 2))
            ones, zeros = torch.ones(8, 1), torch.zeros(8, 1)
            discriminator_loss = (criterion(discriminator(real), ones)
                                  + criterion(discriminator(fake.detach()), zeros))
            discriminator_optimizer.zero_grad()
            discriminator_loss.backward()
            discriminator_optimizer.step()
            generator_loss = criterion(discriminator(fake), ones)
            generator_optimizer.zero_grad()
            generator_loss.backward()
            generator_optimizer.step()
            reference["discriminator"].append(discriminator_loss.item())
            reference["generator"].append(generator_loss.item())
        reference["flags"][context] = flags
    with open(sys.argv[1], "w") as file:
        json.dump(reference, file)


if __name__ == "__main__":
    main()
"""

PRINT_AND_EXIT_SCRIPT = """
import sys

print("to stdout:", sys.stdin.read().strip())
print("to stderr", file=sys.stderr)
sys.exit(3)
"""

RAISE_SCRIPT = """
def load_data():
    raise RuntimeError("the data folder is empty")


load_data()
"""

SIGTERM_SCRIPT = """
import os
import signal

os.kill(os.getpid(), signal.SIGTERM)
"""


# -- helpers ------------------------------------------------------------------------------

def _clean_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items()
            if not name.startswith("RUNLENS_RECORD_")}


def _write_script(folder: Path, name: str, source: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source).lstrip())
    return path


def _record(folder: Path, *arguments: str, stdin: str = "",
            environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*RUNLENS, "record", *arguments], cwd=folder, input=stdin,
                          capture_output=True, text=True, timeout=TIMEOUT,
                          env=environment or _clean_environment())


def _python(folder: Path, *arguments: str, stdin: str = "",
            environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *arguments], cwd=folder, input=stdin,
                          capture_output=True, text=True, timeout=TIMEOUT,
                          env=environment or _clean_environment())


def _read_rows(run_dir: Path, table: str) -> list[dict[str, Any]]:
    parts = sorted((run_dir / table).glob(f"rank-*/{run_format.PART_PREFIX}*"))
    if not parts:
        return []
    data = pa.concat_tables([pq.read_table(part) for part in parts],
                            promote_options="default")
    return sorted(data.to_pylist(), key=lambda row: (row["segment"], row["step"]))


def _runlens_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("runlens:")]


def _program_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("runlens:")]


def _checkpoint_loads(run_dir: Path, segment: int) -> list[dict[str, Any]]:
    return [json.loads(row["detail"]) for row in _read_rows(run_dir, "events")
            if row["kind"] == "checkpoint_load" and row["segment"] == segment]


# -- the runs that several tests read -----------------------------------------------------

@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, Any]:
    """Record the plain loop twice into one run directory: a run and its resume."""
    folder = tmp_path_factory.mktemp("plain")
    _write_script(folder, "train.py", PLAIN_SCRIPT)
    # No timed flush during the loop: a flush reads the buffered tensors on the host.
    options = ["--run-dir", "run", "--param-stats-every", "2", "--flush-seconds", "3600"]
    first = _record(folder, *options, "--", sys.executable, "train.py", "reference-0.json")
    second = _record(folder, *options, "--", sys.executable, "train.py", "reference-1.json")
    return {"folder": folder, "run_dir": folder / "run", "runs": [first, second],
            "references": [json.loads((folder / f"reference-{index}.json").read_text())
                           for index in (0, 1)]}


@pytest.fixture(scope="module")
def accumulate(tmp_path_factory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("accumulate")
    _write_script(folder, "train_accumulate.py", ACCUMULATE_SCRIPT)
    result = _record(folder, "--", sys.executable, "-m", "train_accumulate", "reference.json")
    return {"folder": folder, "result": result,
            "reference": json.loads((folder / "reference.json").read_text())}


@pytest.fixture(scope="module")
def gan(tmp_path_factory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("gan")
    _write_script(folder, "gan.py", GAN_SCRIPT)
    result = _record(folder, "--run-dir", "run", "--", sys.executable, "gan.py",
                     "reference.json")
    return {"folder": folder, "run_dir": folder / "run", "result": result,
            "reference": json.loads((folder / "reference.json").read_text())}


# -- a plain loop, its resume and its analysis --------------------------------------------

def test_plain_loop_exits_cleanly(plain) -> None:
    first, second = plain["runs"]
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert first.stdout == "trained 8 steps\n"
    assert _runlens_lines(first.stderr) == ["runlens: recorded 8 steps to run"]
    assert _runlens_lines(second.stderr) == ["runlens: recorded 8 steps to run (segment 1)"]


def test_plain_loop_loss_matches_script(plain) -> None:
    rows = [row for row in _read_rows(plain["run_dir"], "scalars") if row["segment"] == 0]
    reference = plain["references"][0]["steps"]
    assert [row["step"] for row in rows] == list(range(8))
    assert [row["loss"] for row in rows] == pytest.approx([r["loss"] for r in reference],
                                                         rel=1e-6)


def test_plain_loop_norms_match_script(plain) -> None:
    rows = [row for row in _read_rows(plain["run_dir"], "scalars") if row["segment"] == 0]
    reference = plain["references"][0]["steps"]
    assert [row["clip_total_norm"] for row in rows] == pytest.approx(
        [r["clip_total_norm"] for r in reference], rel=1e-5)
    assert [row["clip_max_norm"] for row in rows] == [1.0] * 8
    assert [row["grad_norm"] for row in rows] == pytest.approx(
        [r["grad_norm"] for r in reference], rel=1e-5)
    # The targets are scaled so that every step clips.
    assert all(r["clip_total_norm"] > 1.0 for r in reference)


def test_plain_loop_finds_model_and_scheduler(plain) -> None:
    meta = json.loads((plain["run_dir"] / run_format.RUN_FILE).read_text())
    assert [param["name"] for param in meta["params"]] == [
        "0.weight", "0.bias", "2.weight", "2.bias"]
    assert meta["optimizer"]["class"] == "Adam"
    assert meta["scheduler"] == {"class": "StepLR"}
    assert meta["settings"]["param_stats_every"] == 2
    learning_rates = [row["lr"] for row in _read_rows(plain["run_dir"], "param_groups")
                      if row["segment"] == 0]
    assert learning_rates == pytest.approx([0.01] * 4 + [0.005] * 4)


def test_resume_appends_segment(plain) -> None:
    meta = json.loads((plain["run_dir"] / run_format.RUN_FILE).read_text())
    assert [segment["start_step"] for segment in meta["segments"]] == [0, 8]
    rows = [row for row in _read_rows(plain["run_dir"], "scalars") if row["segment"] == 1]
    assert [row["step"] for row in rows] == list(range(8, 16))
    assert [row["loss"] for row in rows] == pytest.approx(
        [r["loss"] for r in plain["references"][1]["steps"]], rel=1e-6)


def test_no_host_reads_after_first_step(plain) -> None:
    # Opening the recorder at the first step may read hyperparameters; later steps may not.
    for first_batch, reference in zip((0, 8), plain["references"]):
        assert reference["host_reads"] is not None
        assert [read for read in reference["host_reads"] if read[0] != first_batch] == []


def test_checkpoint_load_before_first_step_recorded(plain) -> None:
    assert _checkpoint_loads(plain["run_dir"], 0) == []
    loads = _checkpoint_loads(plain["run_dir"], 1)
    assert sorted(load["object"] for load in loads) == ["model", "optimizer", "scheduler"]
    (model_load,) = [load for load in loads if load["object"] == "model"]
    assert model_load["missing_keys"] == 0
    assert model_load["unexpected_keys"] == 0
    (optimizer_load,) = [load for load in loads if load["object"] == "optimizer"]
    # Adam's step, exp_avg and exp_avg_sq for each of the 4 parameters.
    assert optimizer_load["state_tensors"] == 12
    events = _read_rows(plain["run_dir"], "events")
    load_steps = {row["step"] for row in events if row["kind"] == "checkpoint_load"}
    assert load_steps == {8}


def test_analyze_reads_recorded_run(plain, tmp_path) -> None:
    report_file = tmp_path / "report.json"
    result = subprocess.run([*RUNLENS, "analyze", str(plain["run_dir"]), "--format",
                             f"json={report_file}", "--fail-on", "never"],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    report = json.loads(report_file.read_text())
    assert report["run"]["steps"] == 16
    assert report["run"]["segments"] == 2
    assert report["summary"]["errored"] == 0


# -- accumulation, GradScaler, python -m and the default run directory ---------------------

def test_module_form_uses_default_run_dir(accumulate) -> None:
    result = accumulate["result"]
    assert result.returncode == 0, result.stderr
    (run_dir,) = (accumulate["folder"] / "runs").iterdir()
    assert re.fullmatch(r"train_accumulate-\d{8}T\d{6}Z", run_dir.name)
    assert _runlens_lines(result.stderr) == [f"runlens: recorded 6 steps to runs/{run_dir.name}"]


def test_accumulated_loss_is_step_total(accumulate) -> None:
    (run_dir,) = (accumulate["folder"] / "runs").iterdir()
    rows = _read_rows(run_dir, "scalars")
    reference = accumulate["reference"]
    assert [row["step"] for row in rows] == list(range(6))
    # The recorded loss is the sum of the 4 unscaled losses, not the scaled ones.
    assert [row["loss"] for row in rows] == pytest.approx([r["loss"] for r in reference],
                                                         rel=1e-6)
    assert rows[2]["loss"] == float("inf")


def test_scaler_skipped_step_recorded(accumulate) -> None:
    (run_dir,) = (accumulate["folder"] / "runs").iterdir()
    rows = _read_rows(run_dir, "scalars")
    assert [row["step_skipped"] for row in rows] == [False, False, True, False, False, False]
    assert [row["amp_scale"] for row in rows] == [r["scale"] for r in accumulate["reference"]]
    meta = json.loads((run_dir / run_format.RUN_FILE).read_text())
    assert meta["amp"] == {"scaler": "GradScaler", "enabled": True}


# -- several optimizers and DataLoader workers --------------------------------------------

def test_gan_records_two_run_dirs(gan) -> None:
    result = gan["result"]
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in gan["run_dir"].iterdir()) == ["0-Adam", "1-Adam"]
    assert _runlens_lines(result.stderr) == ["runlens: recorded 8 steps to run/0-Adam",
                                             "runlens: recorded 8 steps to run/1-Adam"]


def test_gan_losses_match_each_optimizer(gan) -> None:
    # The discriminator steps first in each iteration, so it gets index 0.
    for index, name in ((0, "discriminator"), (1, "generator")):
        run_dir = gan["run_dir"] / f"{index}-Adam"
        rows = _read_rows(run_dir, "scalars")
        assert [row["loss"] for row in rows] == pytest.approx(gan["reference"][name],
                                                             rel=1e-6)
    discriminator_meta = json.loads((gan["run_dir"] / "0-Adam" / "run.json").read_text())
    assert [param["shape"] for param in discriminator_meta["params"]][-2:] == [[1, 8], [1]]
    generator_meta = json.loads((gan["run_dir"] / "1-Adam" / "run.json").read_text())
    assert [param["shape"] for param in generator_meta["params"]][-2:] == [[2, 8], [2]]


def test_dataloader_workers_not_recorded(gan) -> None:
    flags = gan["reference"]["flags"]
    # Forked workers inherit the loaded module but not the variables; spawned workers
    # start without runlens.
    assert flags["fork"] == [[False, True]] * 32
    assert flags["spawn"] == [[False, False]] * 32
    assert _program_lines(gan["result"].stderr) == []


# -- the program's streams, exit code and signals -----------------------------------------

def test_output_and_exit_code_passed_through(tmp_path) -> None:
    _write_script(tmp_path, "script.py", PRINT_AND_EXIT_SCRIPT)
    direct = _python(tmp_path, "script.py", stdin="input text\n")
    recorded = _record(tmp_path, "--", sys.executable, "script.py", stdin="input text\n")
    assert direct.returncode == 3
    assert recorded.returncode == 3
    assert recorded.stdout == direct.stdout == "to stdout: input text\n"
    assert _program_lines(recorded.stderr) == _program_lines(direct.stderr) == ["to stderr"]


def test_traceback_passed_through(tmp_path) -> None:
    _write_script(tmp_path, "script.py", RAISE_SCRIPT)
    direct = _python(tmp_path, "script.py")
    recorded = _record(tmp_path, "--", sys.executable, "script.py")
    assert recorded.returncode == direct.returncode == 1
    assert _program_lines(recorded.stderr) == _program_lines(direct.stderr)
    assert "RuntimeError: the data folder is empty" in recorded.stderr
    assert 'line 2, in load_data' in recorded.stderr


def test_signal_exit_code_passed_through(tmp_path) -> None:
    _write_script(tmp_path, "script.py", SIGTERM_SCRIPT)
    recorded = _record(tmp_path, "--", sys.executable, "script.py")
    assert recorded.returncode == 128 + 15


# -- failures -----------------------------------------------------------------------------

def test_corrupt_run_json_leaves_program_alone(plain, tmp_path) -> None:
    _write_script(tmp_path, "train.py", PLAIN_SCRIPT)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / run_format.RUN_FILE).write_text("{not json")
    recorded = _record(tmp_path, "--run-dir", "run", "--", sys.executable, "train.py",
                       "reference.json")
    # The script prints this line and nothing to stderr, recorded or not.
    assert recorded.returncode == 0
    assert recorded.stdout == "trained 8 steps\n"
    assert _program_lines(recorded.stderr) == []
    warnings = [line for line in recorded.stderr.splitlines()
                if line.startswith("runlens: warning:")]
    assert len(warnings) == 1
    assert "run.json is not valid JSON" in warnings[0]
    # The same computation as the first run of the plain loop, which was recorded.
    recorded_steps = json.loads((tmp_path / "reference.json").read_text())["steps"]
    assert recorded_steps == plain["references"][0]["steps"]
    assert [path.name for path in run_dir.iterdir()] == [run_format.RUN_FILE]
    assert (run_dir / run_format.RUN_FILE).read_text() == "{not json"


def test_bootstrap_failure_warns_once(tmp_path) -> None:
    _write_script(tmp_path, "script.py", PRINT_AND_EXIT_SCRIPT)
    direct = _python(tmp_path, "script.py", stdin="x\n")
    # The variables that `runlens record` sets, with options that the bootstrap rejects.
    environment = {**_clean_environment(), "PYTHONPATH": str(BOOTSTRAP_DIR),
                   "RUNLENS_RECORD_DIR": str(tmp_path / "run"),
                   "RUNLENS_RECORD_OPTIONS": "[1, 2]"}
    broken = _python(tmp_path, "script.py", stdin="x\n", environment=environment)
    assert broken.returncode == direct.returncode == 3
    assert broken.stdout == direct.stdout
    assert _program_lines(broken.stderr) == _program_lines(direct.stderr)
    (warning,) = _runlens_lines(broken.stderr)
    assert warning.startswith("runlens: warning: recording is off:")
    assert "RUNLENS_RECORD_OPTIONS must be a JSON object" in warning


def test_bootstrap_cleans_child_environment(tmp_path) -> None:
    _write_script(tmp_path, "script.py", """
        import os
        import sys

        print(os.environ.get("PYTHONPATH"))
        print(sorted(name for name in os.environ if name.startswith("RUNLENS_RECORD_")))
        print(any(entry.endswith("bootstrap") for entry in sys.path))
    """)
    environment = {**_clean_environment(), "PYTHONPATH": "/some/folder"}
    recorded = _record(tmp_path, "--", sys.executable, "script.py", environment=environment)
    assert recorded.stdout.splitlines() == ["/some/folder", "[]", "False"]
    environment.pop("PYTHONPATH")
    recorded = _record(tmp_path, "--", sys.executable, "script.py", environment=environment)
    assert recorded.stdout.splitlines() == ["None", "[]", "False"]


def test_existing_sitecustomize_still_runs(tmp_path) -> None:
    site_folder = tmp_path / "site"
    site_folder.mkdir()
    # A module attribute, not an environment variable: `runlens record` itself runs this
    # sitecustomize too, and the program would inherit a variable that it set.
    (site_folder / "sitecustomize.py").write_text("SITE_RAN = 'yes'\n")
    _write_script(tmp_path, "script.py", """
        import sys

        print(getattr(sys.modules.get("sitecustomize"), "SITE_RAN", None))
    """)
    environment = {**_clean_environment(), "PYTHONPATH": str(site_folder)}
    recorded = _record(tmp_path, "--", sys.executable, "script.py", environment=environment)
    assert recorded.returncode == 0
    assert recorded.stdout == "yes\n"


def test_isolated_python_reported(tmp_path) -> None:
    _write_script(tmp_path, "script.py", "print('ran')\n")
    recorded = _record(tmp_path, "--run-dir", "run", "--", sys.executable, "-I", "script.py")
    assert recorded.returncode == 0
    assert recorded.stdout == "ran\n"
    assert _runlens_lines(recorded.stderr) == [
        "runlens: recorded no steps to run: the recorder did not start in the program "
        "(python -S, -E and -I do not load it, and it records Python programs only)"]


@pytest.mark.parametrize("arguments", [[], ["--"]])
def test_missing_command_is_error(tmp_path, arguments) -> None:
    result = _record(tmp_path, *arguments)
    assert result.returncode == 2
    assert result.stderr.startswith("runlens: error: no program to run")
    assert len(result.stderr.splitlines()) == 1


def test_unknown_command_is_error(tmp_path) -> None:
    result = _record(tmp_path, "--", "runlens-no-such-program", "train.py")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "runlens: error: command 'runlens-no-such-program' not found: pass a program on "
        "PATH or the path of an executable file, as in runlens record -- python train.py"]
    assert not (tmp_path / "runs").exists()
