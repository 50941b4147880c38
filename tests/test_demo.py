"""The CPU demo, shortened: every step runs end to end, and the effects point the right way."""

import json

from dreampainter.cli import main
from dreampainter.toy.demo import DemoSettings, run_demo, sign_test_p


def test_sign_test():
    assert sign_test_p(6, 6) == 1 / 64
    assert sign_test_p(0, 10) == 1.0
    assert abs(sign_test_p(8, 10) - 56 / 1024) < 1e-12


def test_quick_demo_runs_every_step_through_the_cli(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["seconds"]) == {"toy data", "base model", "stage 1", "stage 2", "evaluation"}
    assert (tmp_path / "results_grid.png").exists()
    assert report["product_max_abs_change"] == 0  # the product is pasted back exactly
    assert "reference fidelity" in capsys.readouterr().out


def test_short_demo_learns_reference_and_text(tmp_path):
    """A shortened demo (about a quarter of the real one) must already move both effects the right way."""
    settings = DemoSettings.short(tmp_path)
    report = run_demo(settings)
    assert report.product_max_abs_change == 0
    assert report.product_psnr > 10
    n = report.reference_wins[1]
    # Directions with a margin, on average and on most samples (the full demo's 48 samples give the
    # significance verdicts; 24 samples of a third of the training are for direction only).
    assert report.reference_ratio > 1.2 and report.reference_wins[0] > n / 2, report.table()
    assert report.reference_with_prompt_ratio > 1.0, report.table()
    assert report.text_ratio > 1.2 and report.text_wins[0] > n / 2, report.table()
