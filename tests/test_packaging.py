"""The wheel: built-in rules inside it, torch only behind an extra, a console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(out), str(ROOT)],
        check=True,
    )
    (path,) = out.glob("runlens-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def _metadata(wheel: zipfile.ZipFile) -> str:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return wheel.read(name).decode()


def test_wheel_contains_builtin_rules(wheel) -> None:
    expected = sorted(
        "runlens/builtin_rules/" + path.relative_to(ROOT / "rules").as_posix()
        for path in (ROOT / "rules").rglob("*.yaml")
    )
    shipped = sorted(n for n in wheel.namelist() if n.startswith("runlens/builtin_rules/"))
    assert expected != []
    assert shipped == expected


def test_wheel_requires_torch_only_in_extras(wheel) -> None:
    requirements = [line for line in _metadata(wheel).splitlines()
                    if line.startswith("Requires-Dist:") and "torch" in line]
    assert requirements != []
    for line in requirements:
        assert "extra ==" in line


def test_wheel_declares_console_script(wheel) -> None:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "runlens = runlens.cli:main" in wheel.read(name).decode()


def test_wheel_contains_rule_schema(wheel) -> None:
    assert "runlens/analyze/rule_schema.json" in wheel.namelist()
