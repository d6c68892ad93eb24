"""`python -m hicache.app.compare_runs`: per-prompt wins, ties and mean differences of two runs."""

import json

import pytest

from hicache.app import compare_runs as paired


def write_run(root, name, values):
    (root / name).mkdir(parents=True)
    lines = [json.dumps({"index": i, "psnr": v, "ssim": v / 100}) for i, v in enumerate(values)]
    (root / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_counts_wins_ties_and_losses_per_prompt(tmp_path):
    write_run(tmp_path, "a", [30.0, 31.0, 25.0, 40.0, 33.0])
    write_run(tmp_path, "b", [29.0, 31.0, 26.0, 35.0, 30.0])
    r = paired.compare(paired.load_metrics(tmp_path / "a"), paired.load_metrics(tmp_path / "b"), "psnr")
    assert (r["n"], r["a_wins"], r["ties"], r["b_wins"]) == (5, 3, 1, 1)
    assert r["mean_diff"] == pytest.approx((1 + 0 - 1 + 5 + 3) / 5)
    assert 0 < r["wilcoxon_p"] <= 1


def test_cli_prints_a_row_per_pair_and_metric_and_fails_in_one_line(tmp_path, capsys):
    write_run(tmp_path, "a", [30.0, 32.0])
    write_run(tmp_path, "b", [29.0, 31.0])
    assert paired.main([str(tmp_path), "a", "b"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| a |")]
    assert [row.split(" | ")[2] for row in rows] == ["psnr", "ssim"] and "| 2 | 2 | 0 | 0 |" in rows[0]
    assert paired.main([str(tmp_path), "a", "missing"]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_paired_stats_is_the_one_paired_comparison():
    from hicache.app.paired import paired_stats

    r = paired_stats([30.0, 31.0, float("inf"), 28.0, 25.0], [29.0, 31.0, float("inf"), 27.0, 26.5])
    assert (r["n"], r["a_wins"], r["ties"], r["b_wins"]) == (5, 2, 2, 1)
    assert r["mean_diff"] == pytest.approx((1 + 0 + 1 - 1.5) / 4)  # the identical (inf) pair is left out of the mean
    assert r["ci_low"] <= r["mean_diff"] <= r["ci_high"] and 0 < r["wilcoxon_p"] <= 1
    one = paired_stats([2.0], [1.0])
    assert one["mean_diff"] == one["ci_low"] == one["ci_high"] == 1.0 and one["wilcoxon_p"] is None
    with pytest.raises(ValueError):
        paired_stats([1.0, 2.0], [1.0])
