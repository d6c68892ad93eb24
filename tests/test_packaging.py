"""`pip install .` (not editable) carries what the main job reads from the package: the shipped testbed
weights, the paper's numbers, every app module; and its requirements cover what the main job imports."""

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    # a clean copy: setuptools writes build/ and *.egg-info into the source tree, and a stale build/lib
    # would put files in the wheel that the checkout no longer has
    source = tmp_path_factory.mktemp("source") / "hicache"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "outputs", "wandb",
                                                                 "__pycache__", ".pytest_cache", ".benchmarks"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    [wheel] = out.glob("hicache-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_wheel_holds_the_package_data_the_main_job_reads(wheel_names):
    shipped = {str(p.relative_to(ROOT)) for folder in ("hicache/testbeds/weights",)
               for p in (ROOT / folder).rglob("*") if p.is_file()}
    assert shipped and shipped <= wheel_names, sorted(shipped - wheel_names)[:5]
    assert "hicache/app/paper_numbers.yaml" in wheel_names
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "hicache").rglob("*.py")}
    assert modules <= wheel_names, sorted(modules - wheel_names)[:5]


def test_install_requires_covers_the_main_jobs_imports():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    required = {line.split(">")[0].split("<")[0].split("=")[0].strip().lower()
                for line in cfg["options"]["install_requires"].splitlines() if line.strip()}
    # experiment=testbed_hicache: Hydra, FluxPipeline's text encoders, SSIM and the checker, W&B (its logger), plots
    assert {"torch", "diffusers", "hydra-core", "omegaconf", "transformers", "safetensors", "scikit-image",
            "wandb", "tqdm", "pillow", "pyyaml", "matplotlib"} <= required
