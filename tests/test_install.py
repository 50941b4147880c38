"""The package as users install it: a wheel built from the repository runs the demo from anywhere, quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Messages that carry no information for a DreamPainter user (see dreampainter/utils/logging.py).
NOISE = ("should be kept in float32: []", "Setting accelerator to CPU", "SetuptoolsDeprecationWarning")

DRIVER = """
import sys
import dreampainter
assert dreampainter.__file__.startswith(sys.argv[1]), dreampainter.__file__  # the wheel, not the checkout
from dreampainter.cli import main
sys.exit(main(["demo", "--quick", "--out", sys.argv[2]]))
"""


@pytest.mark.slow
def test_wheel_runs_the_demo_from_an_unrelated_directory(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
        capture_output=True, text=True, check=False,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    assert not [line for line in (build.stdout + build.stderr).splitlines() if any(n in line for n in NOISE)]
    (wheel,) = (tmp_path / "dist").glob("dreampainter-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    assert "dreampainter/toy/configs/demo_stage1.yaml" in names and "dreampainter/py.typed" in names
    assert not any(name.startswith(("tests/", "configs/", "scripts/")) for name in names)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path / "site"), "out"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((elsewhere / "out" / "report.json").read_text())
    assert report["product_max_abs_change"] == 0
    noisy = [line for line in (run.stdout + run.stderr).splitlines() if any(n in line for n in NOISE)]
    assert not noisy, noisy
