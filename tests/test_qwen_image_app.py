"""Qwen-Image and Qwen-Image-Edit through the experiment app (`run.py`): the three experiments compose with every
value named and smoke-run on the tiny pipelines; missing weights are one line naming the download; the edit sets."""

import json
import random

import pytest
from omegaconf import OmegaConf

import hicache
from hicache.app.qwen_image import SOURCES, edit_scene
from hicache.app.testing import compose_config, run_overrides
from hicache.app.tables import render

T2I_TINY = ("data=tiny_words", "data.limit=2", "sampling.steps=6", "sampling.height=64", "sampling.width=64",
            "metrics=fidelity", "logger=none", "speed.warmup=false")
# The edit pipeline works at ~1024x1024 whatever the input (the tiny VAE makes that 16x16 reference tokens); 128 px
# out: 2x2 noisy tokens.
EDIT_TINY = ("data.n=1", "data.size=64", "sampling.steps=6", "sampling.height=128", "sampling.width=128",
             "metrics=fidelity", "logger=none", "speed.warmup=false")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_qwen_models")


def _hydra(overrides):
    from hydra import initialize_config_dir

    from hicache.app.testing import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose_config(overrides)


@pytest.mark.parametrize("experiment", ["qwen_image_hicache", "qwen_image_edit_hicache"])
def test_experiments_name_the_official_values(experiment, monkeypatch):
    monkeypatch.delenv("QWEN_IMAGE_PATH", raising=False)
    monkeypatch.delenv("QWEN_IMAGE_EDIT_PATH", raising=False)
    cfg = _hydra([f"experiment={experiment}"])
    c = cfg.cache
    assert (c.method, c.interval, c.warmup, c.order, c.sigma, c.factor_dtype) == ("hicache", 7, 3, 3, 0.5, "bfloat16")
    assert cfg.sampling.steps == 50 and cfg.sampling.guidance_scale is None and cfg.sampling.seed_offset == 0
    assert cfg.model.call_kwargs.true_cfg_scale == 4.0 and cfg.model.call_kwargs.negative_prompt == " "
    assert cfg.model.recipe == "qwen_image" and cfg.model.path is None
    if experiment == "qwen_image_hicache":
        assert (cfg.sampling.height, cfg.sampling.width, cfg.data.name, cfg.data.limit) == (1328, 1328, "drawbench", 200)
    else:
        assert cfg.data.name == "edit_set" and cfg.model.pipeline_class == "QwenImageEditPipeline"


def test_table_rows():
    cfg = _hydra(["experiment=qwen_image_table"])
    rows = {name: list(overrides) for name, overrides in cfg.variants.items()}
    assert list(rows) == ["original", "step_reduction_N7", "fora_N7", "taylorseer_N6_O2", "taylorseer_N8_O2",
                          "hicache_N7_O3_s0.5", "hicache_N5_O2_s0.6"]
    assert "cache.sigma=0.6" in rows["hicache_N5_O2_s0.6"] and "cache.order=3" in rows["hicache_N7_O3_s0.5"]
    assert all(any(x.endswith("cache.factor_dtype=bfloat16") for x in o) for n, o in rows.items() if n not in ("original", "step_reduction_N7"))
    assert ",".join(rows) == cfg.hydra.sweeper.params.variant if "hydra" in cfg else True


@pytest.mark.parametrize("kind,env", [("qwen_image", "QWEN_IMAGE_PATH"), ("qwen_image_edit", "QWEN_IMAGE_EDIT_PATH")])
def test_missing_weights_is_one_line_naming_the_download(kind, env, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(env, raising=False)
    experiment = "qwen_image_hicache" if kind == "qwen_image" else "qwen_image_edit_hicache"
    repo = "Qwen/Qwen-Image" if kind == "qwen_image" else "Qwen/Qwen-Image-Edit"
    for extra, says in (([], "model.path is not set"), ([f"model.path={tmp_path / 'nothing'}"], "model_index.json missing")):
        with pytest.raises(SystemExit) as exit_info:
            run_overrides([f"experiment={experiment}", f"paths.outputs={tmp_path}", "logger=none", *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err and repo in err and env in err
    monkeypatch.setenv(env, str(tmp_path / "from_env"))
    with pytest.raises(SystemExit):
        run_overrides([f"experiment={experiment}", f"paths.outputs={tmp_path}", "logger=none"])
    assert "from_env" in capsys.readouterr().err


def test_qwen_image_hicache_smoke_run(tmp_path, models):
    [summary] = run_overrides(["experiment=qwen_image_hicache", "model=tiny_qwen_image", *T2I_TINY,
                               f"model.path={models / 't2i'}", f"paths.outputs={tmp_path}"])
    # 6 steps, N=7, warm-up 3: full at 0, 1, 2; both CFG branches share it
    assert summary["full_steps"] == [0, 1, 2] and summary["ideal_speedup"] == 2.0
    assert 30 < summary["psnr"] < float("inf") and summary["ssim"] < 1.0
    assert 1.5 < summary["flops_speedup"] < 2.0  # embeddings, gates and the output layer still run
    assert summary["cache_mib"] > 0 and summary["order"] == 3


@pytest.mark.parametrize("method", ["clusca", "hi_clusca"])
def test_qwen_image_token_wise_smoke_run(tmp_path, models, method):
    [summary] = run_overrides(["experiment=qwen_image_hicache", f"cache={method}", "cache.clusters=2", "cache.interval=3",
                               "model=tiny_qwen_image", *T2I_TINY, f"model.path={models / 't2i'}", f"paths.outputs={tmp_path}"])
    assert summary["method"] == method and summary["full_steps"] == [0, 1, 2, 5]
    assert 30 < summary["psnr"] < float("inf") and 1.0 < summary["flops_speedup"] < 1.5


def test_qwen_image_table_smoke_run(tmp_path, models):
    summaries = run_overrides(["experiment=qwen_image_table", "model=tiny_qwen_image", *T2I_TINY,
                               "sampling.steps=10", "data.limit=1", f"model.path={models / 't2i'}",
                               f"paths.outputs={tmp_path}"],
                              all_variants=True)
    by_run = {s["variant"]: s for s in summaries}
    assert len(by_run) == 7
    assert by_run["original"]["psnr"] == float("inf") and by_run["original"]["flops_speedup"] == 1.0
    assert by_run["step_reduction_N7"]["steps"] == 4  # 10 steps at N=7, W=3: full at 0, 1, 2, 9
    assert by_run["hicache_N5_O2_s0.6"]["full_steps"] == [0, 1, 2, 7]
    assert by_run["taylorseer_N8_O2"]["full_steps"] == [0, 1, 2]
    table = render(tmp_path / "qwen_image_table")
    assert "| HiCache | 10 | 7 | 3 | 0.5 |" in table and "| HiCache | 10 | 5 | 2 | 0.6 |" in table


def test_qwen_image_edit_smoke_run(tmp_path, models):
    [summary] = run_overrides(["experiment=qwen_image_edit_hicache", "model=tiny_qwen_image_edit", *EDIT_TINY,
                               f"model.path={models / 'edit'}", f"paths.outputs={tmp_path}"])
    assert summary["full_steps"] == [0, 1, 2] and summary["num_outputs"] == 1
    assert 30 < summary["psnr"] < float("inf")
    [record] = [json.loads(line) for line in (tmp_path / "qwen_image_edit_hicache" / summary["run"] / "metrics.jsonl")
                .read_text().splitlines()]
    assert record["image"].endswith("0000.png") and record["prompt"] == edit_scene(random.Random(0), 64)[1]
    # the reference tokens ride in the forecast tensors: the image-stream part alone (attention's image output and
    # img_mlp, D0 and D1, 4 noisy + 256 reference tokens, width 32, bf16, 2 blocks, 2 CFG branches) is a lower bound
    assert summary["cache_mib"] * 2**20 >= 2 * 2 * (4 + 256) * 32 * 2 * 2 * 2


def test_edit_sets(tmp_path):
    data = OmegaConf.create({"name": "edit_set", "source": "edit_set", "n": 3, "size": 32, "seed": 5,
                             "folder": str(tmp_path), "limit": None})
    pairs = SOURCES["edit_set"](data)
    assert pairs == SOURCES["edit_set"](data)  # seeded: the same set every time
    assert len(pairs) == 3 and all((tmp_path / "edit_set_seed5_32px" / f"{i:04d}.png").is_file() for i in range(3))
    table = tmp_path / "edit_set_seed5_32px" / "edits.jsonl"
    as_file = OmegaConf.create({"name": "edit_file", "source": "edit_file", "file": str(table),
                                "column": "instruction", "image_column": "image", "limit": None})
    assert SOURCES["edit_file"](as_file) == pairs
    table.write_text(json.dumps({"image": "missing.png", "instruction": "x"}) + "\n")
    with pytest.raises(hicache.app.errors.SetupError, match="missing.png does not exist"):
        SOURCES["edit_file"](as_file)


def test_an_edit_prompts_reference_is_keyed_by_its_image():
    from hicache.app.prompts import Prompt

    a, b = Prompt(0, "make it red", 0, "a.png"), Prompt(0, "make it red", 0, "b.png")
    assert a.key != b.key and Prompt(0, "make it red", 0).key == "make it red"
