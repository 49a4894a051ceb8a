"""The recorder and the distributed rules under real gloo process groups on the CPU.

Each session runs `WORKER_SOURCE` from a file in a subprocess, which forks one process
per rank; the ranks join a process group with
`init_method="tcp://127.0.0.1:<free port>"`. A session records several run directories
in one process group, to pay the start-up once, and each rank writes what it observed
(collectives called from runlens frames, writes of run.json, recorder errors) to
`rank-<r>.json` beside the run directories.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import runlens
from runlens.analyze import Run, evaluate, load_rules
from runlens.cli import app
from recorder_helpers import make_model, read_rows, read_table, total_loss

SESSION_TIMEOUT_SECONDS = 240
DYING_STEP = 25
FLUSH_EVERY_WHEN_DYING = 10

WORKER_SOURCE = r'''
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import runlens
import runlens.recorder.recorder

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor",
               "all_to_all", "all_to_all_single", "barrier", "broadcast",
               "broadcast_object_list", "gather", "gather_object", "monitored_barrier",
               "recv", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter",
               "scatter_object_list", "send", "isend", "irecv")
RUNLENS_DIR = os.path.dirname(runlens.__file__)
# The settings that the test passes on the command line.
SETTINGS = {}


class Observations:
    """Counts of calls that runlens made, kept while the patches are installed."""

    def __init__(self):
        self.collectives = {}
        self.run_json_writes = 0

    def install(self):
        for module in (dist, dist.distributed_c10d):
            for name in COLLECTIVES:
                original = getattr(module, name, None)
                if original is not None:
                    setattr(module, name, self._counted(name, original))
        original_replace = os.replace

        def replace(source, destination, *args, **kwargs):
            if os.path.basename(os.fspath(destination)) == "run.json":
                self.run_json_writes += 1
            return original_replace(source, destination, *args, **kwargs)
        os.replace = replace

    def _counted(self, name, original):
        def counted(*args, **kwargs):
            if called_from_runlens():
                self.collectives[name] = self.collectives.get(name, 0) + 1
            return original(*args, **kwargs)
        return counted


def called_from_runlens():
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(RUNLENS_DIR):
            return True
        frame = frame.f_back
    return False


class SyncGuard:
    """Makes the tensor methods that read a value on the host raise in runlens frames."""

    METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")

    def __init__(self):
        self.originals = {name: getattr(torch.Tensor, name) for name in self.METHODS}

    def install(self):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, self._guarded(name, original))

    def remove(self):
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)

    @staticmethod
    def _guarded(name, original):
        def guarded(self, *args, **kwargs):
            if called_from_runlens():
                raise AssertionError(f"runlens called Tensor.{name} on the step path")
            return original(self, *args, **kwargs)
        return guarded


def wait_for_parts(folder, count):
    """Wait until the writer thread has put `count` parts into `folder`, for at most 20 s.

    A part handed to the writer is lost when the process dies before the writer renames
    it into place, so the dying rank waits for the parts of its flushes.
    """
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if folder.is_dir() and len(list(folder.glob("part-*.parquet"))) >= count:
            return
        time.sleep(0.05)


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def batch(rank, step):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    inputs = torch.randn(16, 8, generator=generator)
    return inputs, inputs[:, :4].sum(dim=1, keepdim=True).repeat(1, 4)


def train(run_dir, model, optimizer, rank, steps, before_forward=None, die_at=None,
          clip=None, guard_sync=False, **options):
    options = {"param_stats_every": 5, "flush_every": 1000, "flush_seconds": 3600.0,
               **options}
    guard = SyncGuard()
    with runlens.record(run_dir, model=model, optimizer=optimizer, **options) as rec:
        for step in range(steps):
            if die_at is not None and rank == 1 and step == die_at:
                wait_for_parts(Path(run_dir) / "scalars" / "rank-1",
                               die_at // options["flush_every"])
                os._exit(3)
            if guard_sync and step == 1:
                guard.install()
            if before_forward is not None:
                before_forward(rank)
            inputs, targets = batch(rank, rec.step_index)
            loss = nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            rec.step(loss)
        guard.remove()
    return rec


def ddp(seed):
    return nn.parallel.DistributedDataParallel(mlp(seed))


def open_late(rank):
    # Rank 1 opens the run directory after rank 0 has rewritten run.json, the order in
    # which a rank that numbers its segment from run.json would number it one higher.
    if rank == 1:
        time.sleep(0.3)


def healthy(out, rank, result):
    model = ddp(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    open_late(rank)
    first = train(out / "healthy", model, optimizer, rank, 40, guard_sync=True,
                  strict=True)
    open_late(rank)
    resumed = train(out / "healthy", model, optimizer, rank, 20, guard_sync=True,
                    strict=True)
    result["segments"] = [first.segment, resumed.segment]
    result["errors"] = [first.error_counts, resumed.error_counts]


def desync(out, rank, result):
    model = ddp(0)
    if rank == 1:
        # After the wrap, so that DDP's broadcast of rank 0's parameters does not undo it.
        with torch.no_grad():
            nn.init.normal_(model.module[2].weight, std=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    result["errors"] = train(out / "desync", model, optimizer, rank, 40).error_counts


def straggler(out, rank, result):
    def slow_loader(rank):
        if rank == 1:
            time.sleep(0.03)

    model = ddp(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    result["errors"] = train(out / "straggler", model, optimizer, rank, 80,
                             before_forward=slow_loader).error_counts


def fsdp(out, rank, result):
    from torch.distributed.fsdp import fully_shard

    model = mlp(0)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rec = train(out / "fsdp", model, optimizer, rank, 10, clip=1.0, param_stats_every=1)
    result["errors"] = rec.error_counts
    # The whole parameters' norms after the last step, gathered here, not by runlens.
    result["full_norms"] = {name: param.full_tensor().norm().item()
                            for name, param in model.named_parameters()}


def rank_one_alone(out, rank, result):
    # Rank 0 never opens this run, so rank 1 waits for its segment number, gives up
    # after the (shortened) wait, and records with its own numbering.
    if rank == 1:
        runlens.recorder.recorder.RANK_ZERO_WAIT_SECONDS = 1.0
        model = mlp(0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        rec = train(out / "rank-one-alone", model, optimizer, rank, 3)
        result["segments"] = [rec.segment]


def dying(out, rank, result):
    model = ddp(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    try:
        train(out / "dying", model, optimizer, rank, 40, die_at=SETTINGS["dying_step"],
              flush_every=SETTINGS["flush_every"])
    except RuntimeError as error:
        # Rank 1 is gone, so gloo fails rank 0's all-reduce of the next step.
        result["error"] = str(error)[:300]


SCENARIOS = {"healthy": healthy, "desync": desync, "straggler": straggler, "fsdp": fsdp,
             "rank_one_alone": rank_one_alone, "dying": dying}


def run_rank(rank, settings):
    out = Path(settings["out"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{settings['port']}",
                            rank=rank, world_size=settings["world_size"],
                            timeout=datetime.timedelta(seconds=30))
    observations = Observations()
    observations.install()
    result = {}

    def save():
        # After every scenario, because the dying rank ends with os._exit.
        result["collectives"] = observations.collectives
        result["run_json_writes"] = observations.run_json_writes
        (out / f"rank-{rank}.json").write_text(json.dumps(result))

    try:
        for name in settings["scenarios"]:
            result[name] = {}
            save()
            SCENARIOS[name](out, rank, result[name])
            result[name]["completed"] = True
    finally:
        save()


def main():
    """Fork one process per rank and write their exit codes to exit-codes.json.

    The ranks are forked after torch and torch._dynamo (which DDP imports) are loaded,
    so that they share those imports instead of each paying for them.
    """
    import torch._dynamo  # noqa: F401

    SETTINGS.update(json.loads(sys.argv[1]))
    out = Path(SETTINGS["out"])
    torch.set_num_threads(1)
    children = {}
    for rank in range(SETTINGS["world_size"]):
        pid = os.fork()
        if pid == 0:
            log = os.open(out / f"rank-{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = 0
            try:
                run_rank(rank, SETTINGS)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = rank
    codes = {}
    for pid, rank in children.items():
        _, status = os.waitpid(pid, 0)
        codes[rank] = os.waitstatus_to_exitcode(status)
    (out / "exit-codes.json").write_text(json.dumps([codes[rank] for rank in sorted(codes)]))


main()
'''


class Session:
    """The folder of one process group's runs, with each rank's exit code and results."""

    def __init__(self, folder: Path, exit_codes: list[int]) -> None:
        self.folder = folder
        self.exit_codes = exit_codes
        self.results = []
        for rank in range(len(exit_codes)):
            result_file = folder / f"rank-{rank}.json"
            self.results.append(json.loads(result_file.read_text())
                                if result_file.exists() else {})

    def log(self, rank: int) -> str:
        """Return the end of a rank's output, for assertion messages."""
        return (self.folder / f"rank-{rank}.log").read_text()[-3000:]

    def run(self, name: str) -> Path:
        return self.folder / name


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_session(folder: Path, world_size: int, scenarios: list[str]) -> Session:
    """Run the scenarios, in order, in one gloo process group of `world_size` processes."""
    folder.mkdir(parents=True, exist_ok=True)
    worker = folder / "worker.py"
    worker.write_text(WORKER_SOURCE)
    settings = {"world_size": world_size, "port": _free_port(), "out": str(folder),
                "scenarios": scenarios, "dying_step": DYING_STEP,
                "flush_every": FLUSH_EVERY_WHEN_DYING}
    # A session of its own, so that a timeout kills the launcher and its forked ranks.
    launcher = subprocess.Popen([sys.executable, str(worker), json.dumps(settings)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        output, _ = launcher.communicate(timeout=SESSION_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        output, _ = launcher.communicate()
    (folder / "launcher.log").write_text(output)
    codes_file = folder / "exit-codes.json"
    if not codes_file.exists():
        pytest.fail(f"the launcher of {world_size} ranks wrote no exit codes:\n{output}")
    return Session(folder, json.loads(codes_file.read_text()))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Session:
    """Two ranks: a healthy run and its resume, the two rule scenarios, FSDP2, a run
    that only rank 1 opens, and last a run in which rank 1 dies."""
    return run_session(tmp_path_factory.mktemp("two_ranks"), 2,
                       ["healthy", "desync", "straggler", "fsdp", "rank_one_alone",
                        "dying"])


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> Session:
    return run_session(tmp_path_factory.mktemp("four_ranks"), 4, ["healthy"])


@pytest.fixture(scope="module")
def rules():
    return load_rules()


def _analyze(run_dir: Path, rules):
    with Run.open(run_dir) as run:
        return evaluate(run, rules)


def _scalars(run_dir: Path) -> list[dict]:
    return read_rows(run_dir, "scalars")


def _steps_by_rank(rows: list[dict]) -> dict[int, list[tuple[int, int]]]:
    steps: dict[int, list[tuple[int, int]]] = {}
    for row in rows:
        steps.setdefault(row["rank"], []).append((row["segment"], row["step"]))
    return {rank: sorted(keys) for rank, keys in steps.items()}


# -- the sessions ran -----------------------------------------------------------------------

def test_two_rank_session_completes(two_ranks):
    # Rank 1 leaves the last scenario with os._exit(3); rank 0 finishes after its error.
    assert two_ranks.exit_codes == [0, 3], two_ranks.log(0) + two_ranks.log(1)
    for name in ("healthy", "desync", "straggler", "fsdp", "rank_one_alone"):
        assert two_ranks.results[0][name].get("completed"), two_ranks.log(0)
        assert two_ranks.results[1][name].get("completed"), two_ranks.log(1)


def test_four_rank_session_completes(four_ranks):
    for rank, code in enumerate(four_ranks.exit_codes):
        assert code == 0, four_ranks.log(rank)


# -- one run directory, written by every rank ------------------------------------------------

@pytest.mark.parametrize("session_name", ["two_ranks", "four_ranks"])
def test_every_rank_writes_own_parts(session_name, request):
    session = request.getfixturevalue(session_name)
    world_size = len(session.exit_codes)
    run_dir = session.run("healthy")
    for table in ("scalars", "params", "events"):
        folders = sorted(path.name for path in (run_dir / table).iterdir())
        assert folders == [f"rank-{rank}" for rank in range(world_size)]


@pytest.mark.parametrize("session_name", ["two_ranks", "four_ranks"])
def test_only_rank_zero_writes_run_json(session_name, request):
    session = request.getfixturevalue(session_name)
    openings = 2 if session_name == "four_ranks" else 6
    assert session.results[0]["run_json_writes"] == openings
    for result in session.results[1:]:
        assert result["run_json_writes"] == 0


@pytest.mark.parametrize("session_name", ["two_ranks", "four_ranks"])
def test_steps_aligned_across_ranks(session_name, request):
    session = request.getfixturevalue(session_name)
    world_size = len(session.exit_codes)
    run_dir = session.run("healthy")
    expected = [(0, step) for step in range(40)] + [(1, step) for step in range(40, 60)]
    scalar_steps = _steps_by_rank(_scalars(run_dir))
    assert sorted(scalar_steps) == list(range(world_size))
    for rank in range(world_size):
        assert scalar_steps[rank] == expected
    stats_steps = {rank: sorted(set(keys)) for rank, keys
                   in _steps_by_rank(read_rows(run_dir, "params")).items()}
    assert stats_steps[0] == [(0, step) for step in range(0, 40, 5)] + \
        [(1, step) for step in range(40, 60, 5)]
    for rank in range(1, world_size):
        assert stats_steps[rank] == stats_steps[0]


@pytest.mark.parametrize("session_name", ["two_ranks", "four_ranks"])
def test_resume_numbers_segment_alike(session_name, request):
    session = request.getfixturevalue(session_name)
    meta = json.loads((session.run("healthy") / "run.json").read_text())
    assert [record["segment"] for record in meta["segments"]] == [0, 1]
    assert [record["start_step"] for record in meta["segments"]] == [0, 40]
    for result in session.results:
        assert result["healthy"]["segments"] == [0, 1]


@pytest.mark.parametrize("session_name", ["two_ranks", "four_ranks"])
def test_run_json_records_process_group(session_name, request):
    session = request.getfixturevalue(session_name)
    world_size = len(session.exit_codes)
    meta = json.loads((session.run("healthy") / "run.json").read_text())
    assert meta["world_size"] == world_size
    for record in meta["segments"]:
        assert record["distributed"] == {"backend": "gloo", "world_size": world_size}


def test_rank_waits_then_records_without_rank_zero(two_ranks):
    assert two_ranks.results[1]["rank_one_alone"]["segments"] == [0]
    assert "did not get the segment number" in two_ranks.log(1)
    rows = _scalars(two_ranks.run("rank-one-alone"))
    assert [(row["rank"], row["step"]) for row in rows] == [(1, 0), (1, 1), (1, 2)]


# -- nothing on the step path -------------------------------------------------------------

@pytest.mark.parametrize("session_name", ["two_ranks", "four_ranks"])
def test_no_collective_from_runlens(session_name, request):
    session = request.getfixturevalue(session_name)
    for result in session.results:
        assert result["collectives"] == {}


@pytest.mark.parametrize("session_name", ["two_ranks", "four_ranks"])
def test_no_recorder_error_or_sync(session_name, request):
    # The healthy run is strict with a guard on the syncing tensor methods from step 1,
    # so a sync in a runlens hook would raise into training and fail the session.
    session = request.getfixturevalue(session_name)
    for result in session.results:
        assert result["healthy"]["errors"] == [{}, {}]


def test_rule_scenarios_record_without_errors(two_ranks):
    for result in two_ranks.results:
        for name in ("desync", "straggler", "fsdp"):
            assert result[name]["errors"] == {}


# -- timings ---------------------------------------------------------------------------

def test_timings_recorded_after_first_step(two_ranks):
    rows = _scalars(two_ranks.run("healthy"))
    for row in rows:
        first_of_segment = row["step"] in (0, 40)
        for column in ("step_time", "data_time"):
            assert (row[column] is None) == first_of_segment, (column, row)
        assert row["compute_time"] is not None
        assert row["compute_time"] >= 0


def test_straggler_data_time_exceeds_others(two_ranks):
    rows = _scalars(two_ranks.run("straggler"))
    medians = {rank: statistics.median(row["data_time"] for row in rows
                                       if row["rank"] == rank and row["data_time"] is not None)
               for rank in (0, 1)}
    assert medians[1] > medians[0]


# -- FSDP2 -------------------------------------------------------------------------------

def test_fsdp_norms_are_per_shard(two_ranks):
    rows = read_rows(two_ranks.run("fsdp"), "params")
    last_step = max(row["step"] for row in rows)
    full_norms = two_ranks.results[0]["fsdp"]["full_norms"]
    assert sorted({row["param"] for row in rows}) == sorted(full_norms)
    for name, full_norm in full_norms.items():
        shards = [row for row in rows if row["step"] == last_step and row["param"] == name]
        assert sorted(row["rank"] for row in shards) == [0, 1]
        assert all(row["sharded"] is True for row in shards)
        combined = math.sqrt(sum(row["param_norm"] ** 2 for row in shards))
        assert combined == pytest.approx(full_norm, rel=1e-5)
        assert shards[0]["param_norm"] != shards[1]["param_norm"]


def test_fsdp_records_clip_norm_and_no_compute_time(two_ranks):
    rows = _scalars(two_ranks.run("fsdp"))
    assert len(rows) == 20
    assert all(row["clip_total_norm"] is not None for row in rows)
    assert all(row.get("compute_time") is None for row in rows)
    by_step = {}
    for row in rows:
        by_step.setdefault(row["step"], []).append(row["clip_total_norm"])
    # clip_grad_norm_ returns the whole gradient's norm, the same on both ranks.
    assert all(norms[0] == norms[1] for norms in by_step.values())
    # grad_norm, of each rank's shards after clipping at 1.0, adds up to the whole norm.
    for step, norms in by_step.items():
        shards = [row["grad_norm"] for row in rows if row["step"] == step]
        combined = math.sqrt(sum(norm ** 2 for norm in shards))
        assert combined == pytest.approx(min(norms[0], 1.0), rel=1e-4)


def test_rank_desync_skips_sharded_params(two_ranks, rules):
    report = _analyze(two_ranks.run("fsdp"), rules)
    assert "rank-desync" in report.passed
    assert [finding.rule_id for finding in report.findings] == []


# -- a rank that dies ----------------------------------------------------------------------

def test_dying_rank_keeps_flushed_steps(two_ranks):
    rows = _scalars(two_ranks.run("dying"))
    dead_rank_steps = sorted(row["step"] for row in rows if row["rank"] == 1)
    last_flushed = DYING_STEP // FLUSH_EVERY_WHEN_DYING * FLUSH_EVERY_WHEN_DYING
    assert dead_rank_steps == list(range(last_flushed))
    survivor_steps = sorted(row["step"] for row in rows if row["rank"] == 0)
    assert survivor_steps == list(range(DYING_STEP))


def test_dying_rank_survivor_records_error(two_ranks):
    assert "error" in two_ranks.results[0]["dying"]
    events = read_rows(two_ranks.run("dying"), "events")
    kinds = [(row["rank"], row["kind"]) for row in events]
    assert (0, "training_error") in kinds


def test_dying_rank_run_analyzes(two_ranks):
    result = CliRunner().invoke(app, ["analyze", str(two_ranks.run("dying")),
                                      "--format", "json"])
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.output)
    assert report["errored"] == []
    assert report["run"]["ranks"] == 2


# -- the two rules ---------------------------------------------------------------------------

def test_rank_desync_fires_on_reinitialized_layer(two_ranks, rules):
    report = _analyze(two_ranks.run("desync"), rules)
    findings = [finding for finding in report.findings if finding.rule_id == "rank-desync"]
    assert len(findings) == 1
    finding = findings[0]
    assert (finding.step_start, finding.step_end) == (0, 35)
    assert finding.evidence["rank"] == 1
    assert finding.evidence["reference_rank"] == 0
    assert finding.evidence["signal"] == "param_norm"
    assert finding.evidence["names"] == "module.2.weight"
    assert finding.evidence["largest_difference"] > 0.1


def test_straggler_rank_fires_on_slow_loader(two_ranks, rules):
    report = _analyze(two_ranks.run("straggler"), rules)
    findings = [finding for finding in report.findings if finding.rule_id == "straggler-rank"]
    assert len(findings) == 1
    finding = findings[0]
    assert (finding.step_start, finding.step_end) == (0, 79)
    assert finding.evidence["rank"] == 1
    assert finding.evidence["signal"] == "data_time"
    assert 0 < finding.evidence["lost_share"] < 1


def test_rules_fire_only_on_their_runs(two_ranks, rules):
    desync = {finding.rule_id for finding in _analyze(two_ranks.run("desync"), rules).findings}
    straggler = {finding.rule_id
                 for finding in _analyze(two_ranks.run("straggler"), rules).findings}
    assert desync == {"rank-desync"}
    assert straggler == {"straggler-rank"}


@pytest.mark.parametrize("session_name", ["two_ranks", "four_ranks"])
def test_rules_silent_on_healthy_ddp(session_name, request, rules):
    report = _analyze(request.getfixturevalue(session_name).run("healthy"), rules)
    assert [finding.key for finding in report.findings] == []
    assert "rank-desync" in report.passed
    assert "straggler-rank" in report.passed


# -- single process ------------------------------------------------------------------------------

def test_rules_not_evaluated_without_process_group(tmp_path, rules):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, param_stats_every=1,
                        timer=lambda: 0.0) as rec:
        for step in range(3):
            loss = total_loss(model, step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            rec.step(loss)
    report = _analyze(tmp_path, rules)
    missing = {item.rule_id: item.missing for item in report.not_evaluated}
    assert missing["rank-desync"] == ("segments.distributed",)
    assert missing["straggler-rank"] == ("segments.distributed",)


def test_timer_records_timings_in_one_process(tmp_path):
    readings = iter(range(1000))
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, strict=True,
                        timer=lambda: float(next(readings))) as rec:
        for step in range(3):
            loss = total_loss(model, step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            rec.step(loss)
    rows = _scalars(tmp_path)
    # Each step reads the timer at the forward call, at each of the 8 parameters'
    # gradients and at `Recorder.step`: 10 readings, the last gradient 8 after the forward.
    assert [row["step_time"] for row in rows] == [None, 10.0, 10.0]
    assert [row["data_time"] for row in rows] == [None, 1.0, 1.0]
    assert [row["compute_time"] for row in rows] == [8.0, 8.0, 8.0]


def test_timings_absent_without_process_group_or_timer(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer) as rec:
        loss = total_loss(model, 0)
        loss.backward()
        optimizer.step()
        rec.step(loss)
    columns = read_table(tmp_path, "scalars").column_names
    for column in ("step_time", "data_time", "compute_time"):
        assert column not in columns


def test_timer_must_be_callable(tmp_path):
    with pytest.raises(TypeError, match="timer must be a callable"):
        runlens.record(tmp_path / "run", timer=0.5)
    assert not (tmp_path / "run").exists()
