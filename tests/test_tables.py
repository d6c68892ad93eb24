"""`python -m hicache.app.tables`: one Markdown table per experiment, paper numbers beside ours with their source."""

import json
import subprocess
import sys

import yaml

from hicache.app.tables import load_paper_numbers, render, PAPER_NUMBERS


def write_summary(root, experiment, run, **values):
    base = {"experiment": experiment, "run": run, "model": "flux_dev", "steps": 50, "reference_steps": 50,
            "height": 1024, "width": 1024, "device": "cuda:0", "num_outputs": 200}
    path = root / experiment / run / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**base, **values}))


def test_rows_are_ordered_formatted_and_show_paper_numbers(tmp_path):
    write_summary(tmp_path, "flux_table", "hicache", method="hicache", label="HiCache", interval=7, order=2, sigma=0.5,
                  flops_speedup=5.5, latency_speedup=4.9, psnr=30.123, ssim=0.9, lpips="n/a", image_reward=0.99)
    write_summary(tmp_path, "flux_table", "original", method="none", label="original", interval=None, order=None,
                  sigma=None, flops_speedup=1.0, latency_speedup=1.0, psnr=float("inf"), ssim=1.0, lpips="n/a")
    write_summary(tmp_path, "flux_table", "fora", method="fora", label="FORA", interval=7, order=0, sigma=None,
                  flops_speedup=5.5, latency_speedup=5.1, psnr=20.0, ssim=0.7, lpips="n/a")
    paper = tmp_path / "paper.yaml"
    paper.write_text(yaml.safe_dump({"rows": [
        {"model": "flux_dev", "method": "hicache", "steps": 50, "interval": 7, "order": 2, "sigma": 0.5,
         "image_reward": 1.0, "source": "a test table"},
        {"model": "flux_dev", "method": "hicache", "steps": 50, "interval": 5, "order": 2, "sigma": 0.5,
         "image_reward": 2.0, "source": "another row"},
    ]}))
    table = render(tmp_path, paper)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    assert [r.split(" | ")[0] for r in rows] == ["| original", "| FORA", "| HiCache"]
    assert rows[2] == "| HiCache | 50 | 7 | 2 | 0.5 | 200 | 5.50x | 4.90x | 0.9900 / 1.0000 | 30.12 | 0.9000 | n/a |"
    assert "inf" in rows[0] and "| - |" in rows[0]
    assert "a test table" in table and "another row" not in table
    assert "CLIP" not in table and "Checker" not in table  # columns nobody measured are left out


def test_paper_numbers_file_is_valid_and_every_row_has_a_source():
    for row in load_paper_numbers(PAPER_NUMBERS):
        assert row["source"] and row["model"] and row["method"]


def test_cli_renders_and_fails_in_one_line_on_an_empty_folder(tmp_path):
    empty = subprocess.run([sys.executable, "-m", "hicache.app.tables", str(tmp_path)], capture_output=True, text=True)
    assert empty.returncode == 2 and empty.stderr.strip() == f"error: no summary.json under {tmp_path}"
    write_summary(tmp_path, "e", "r", method="hicache", label="HiCache", interval=7, order=2, sigma=0.5, psnr=31.0)
    out = subprocess.run([sys.executable, "-m", "hicache.app.tables", str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("## e\n")


def test_plot_draws_fidelity_against_sigma_interval_and_speedup(tmp_path):
    for sigma, psnr in ((0.3, 30.0), (0.5, 32.0), (0.7, 31.0)):
        write_summary(tmp_path, "sweep", f"s{sigma}", method="hicache", label="HiCache", interval=7, order=2, sigma=sigma,
                      psnr=psnr, ssim=0.9, latency_speedup=3.0 + sigma, flops_speedup=5.1)
    for interval in (5, 9):
        write_summary(tmp_path, "sweep", f"n{interval}", method="fora", label="FORA", interval=interval, order=0,
                      sigma=None, psnr=25.0 - interval, ssim=0.8, latency_speedup=float(interval) / 2, flops_speedup=4.0)
    write_summary(tmp_path, "sweep", "original", method="none", label="original", interval=None, order=None, sigma=None,
                  psnr=float("inf"), ssim=1.0, latency_speedup=1.0, flops_speedup=1.0)
    out = subprocess.run([sys.executable, "-m", "hicache.app.tables", str(tmp_path), "--plot"], capture_output=True,
                         text=True, check=True)
    plots = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert [p.rsplit("_", 1)[1] for p in plots] == ["interval.png", "sigma.png", "speedup.png"]
    assert all((tmp_path / "plots" / p).stat().st_size > 5000 for p in plots)
    assert out.stderr.count("plot: ") == 3


def test_plot_leaves_out_an_axis_nothing_sweeps(tmp_path):
    from hicache.app.plots import plot

    write_summary(tmp_path, "one", "a", method="hicache", label="HiCache", interval=7, order=2, sigma=0.5, psnr=30.0,
                  ssim=0.9, latency_speedup=3.0)
    assert [p.name.rsplit("_", 1)[1] for p in plot(tmp_path)] == ["speedup.png"]
