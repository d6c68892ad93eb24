"""The testbed's procedural dataset and its attribute checker."""

import numpy as np
import pytest

from hicache.testbeds.flux_shapes import ShapesDataset, accuracy, check, heldout_captions, heldout_scenes, parse_caption, render
from hicache.testbeds.flux_shapes.dataset import COLOURS, SHAPES, is_heldout, training_scene


def test_dataset_is_deterministic_by_seed_and_index():
    a, b, c = ShapesDataset(seed=3), ShapesDataset(seed=3), ShapesDataset(seed=4)
    im_a, cap_a = a[17]
    im_b, cap_b = b[17]
    assert cap_a == cap_b and np.array_equal(np.asarray(im_a), np.asarray(im_b))
    assert [c.scene(i).caption for i in range(20)] != [a.scene(i).caption for i in range(20)]
    assert im_a.size == (64, 64) and im_a.mode == "RGB"


def test_heldout_split_is_disjoint_and_deterministic():
    train = {training_scene(0, i).caption for i in range(500)}
    held = heldout_captions(64, seed=0)
    assert len(set(held)) == 64 and held == heldout_captions(64, seed=0)
    assert all(is_heldout(c) for c in held) and not train & set(held)
    assert not any(is_heldout(c) for c in train)


def test_captions_follow_the_grammar_and_parse_back():
    scenes = [training_scene(1, i) for i in range(200)]
    assert {len(s.shapes) for s in scenes} == {1, 2}
    for s in scenes:
        parsed = parse_caption(s.caption)
        assert parsed.caption == s.caption
    with pytest.raises(ValueError, match="grammar"):
        parse_caption("a photo of an astronaut riding a horse")


def test_checker_is_right_on_dataset_images():
    scenes = [training_scene(5, i) for i in range(120)] + heldout_scenes(40, seed=5)
    results = [check(render(s), s.caption) for s in scenes]
    assert accuracy(results) >= 0.99
    assert {"shape", "colour", "position", "size", "background_colour", "background_style"} <= set(results[0])


def _swap(caption: str, old: str, new: str) -> str:
    return caption.replace(f" {old} ", f" {new} ", 1)


def test_checker_rejects_wrong_attributes():
    """Each attribute the checker reports is falsifiable: change one caption word, that key fails."""
    rng = np.random.default_rng(0)
    wrong = {"shape": 0, "colour": 0, "position": 0, "size": 0, "background_style": 0}
    trials = 0
    for i in range(40):
        scene = training_scene(7, i)
        if len(scene.shapes) != 1:
            continue
        trials += 1
        spec, image = scene.shapes[0], render(scene)
        cap = scene.caption
        other_shape = [s for s in SHAPES if s != spec.shape][rng.integers(3)]
        free = [c for c in COLOURS if c not in (spec.colour, scene.background_colour)]
        other_size = "large" if spec.size == "small" else "small"
        checks = {
            "shape": _swap(cap, spec.shape, other_shape),
            "colour": cap.replace(f" {spec.colour} {spec.shape}", f" {free[rng.integers(len(free))]} {spec.shape}", 1),
            "size": cap.replace(f"a {spec.size} ", f"a {other_size} ", 1),
            "background_style": cap.replace(f" {scene.background_style} background",
                                            " plain background" if scene.background_style != "plain" else " striped background"),
        }
        row, col = spec.cell
        moved = "at the bottom right" if (row, col) != (2, 2) else "at the top left"
        from hicache.testbeds.flux_shapes.dataset import POSITIONS

        checks["position"] = cap.replace(POSITIONS[spec.cell], moved, 1)
        for key, bad_caption in checks.items():
            wrong[key] += not check(image, bad_caption)[key]
    assert trials >= 20
    for key, n in wrong.items():
        assert n >= 0.95 * trials, (key, n, trials)


def test_checker_finds_nothing_on_a_blank_image():
    blank = np.full((64, 64, 3), 30, dtype=np.uint8)
    result = check(blank, "a small red circle in the center on a blue plain background")
    assert not any(result[k] for k in ("shape", "colour", "position", "size", "background_colour"))


def test_variation_widens_scenes_without_changing_captions():
    from hicache.testbeds.flux_shapes.dataset import DEFAULT_VARIATION, Variation, is_heldout, shipped_variation

    wide = Variation(jitter=5.0, size_spread=0.15, texture=0.25)
    varied = ShapesDataset(seed=2, variation=wide)
    scenes = [varied.scene(i) for i in range(60)]
    assert all(s.texture is not None for s in scenes)
    assert len({round(spec.scale, 3) for s in scenes for spec in s.shapes}) > 30
    assert max(abs(o) for s in scenes for spec in s.shapes for o in spec.offset) > 3.0
    # the same caption renders differently when only unsaid properties change
    a = render(scenes[0])
    b = render(type(scenes[0])(scenes[0].shapes, scenes[0].background_colour, scenes[0].background_style, None))
    assert np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean() > 1.0
    # the checker still reads what the caption states (background style is the one it misreads at times)
    results = [check(render(s), s.caption) for s in scenes]
    assert accuracy(results) >= 0.95
    assert np.mean([r["shape"] and r["position"] and r["size"] for r in results]) >= 0.95
    # a variation that draws more random numbers per scene draws other held-out captions, so a testbed's
    # held-out set is its own variation's (testbed.json), still all held out
    assert [s.caption for s in heldout_scenes(10, seed=1)] == heldout_captions(10, seed=1, variation=DEFAULT_VARIATION)
    assert all(is_heldout(c) for c in heldout_captions(10, seed=1, variation=wide))
    assert heldout_captions(10, seed=1) == heldout_captions(10, seed=1, variation=shipped_variation())


UNSAID = dict(unsaid_size=0.5, unsaid_position=0.5, unsaid_style=0.5)


def test_unsaid_attributes_leave_the_default_stream_alone_and_parse_back():
    from hicache.testbeds.flux_shapes.dataset import Variation

    assert [training_scene(2, i).caption for i in range(50)] == [training_scene(2, i, Variation()).caption for i in range(50)]
    scenes = [training_scene(2, i, Variation(**UNSAID)) for i in range(300)]
    captions = [s.caption for s in scenes]
    assert any(not s.says_style for s in scenes) and any(not sh.says_position for s in scenes for sh in s.shapes)
    assert any(" in the center" not in c and " at " not in c and " on the " not in c for c in captions)
    for s in scenes:
        parsed = parse_caption(s.caption)
        assert parsed.caption == s.caption
        assert [(p.says_size, p.says_position) for p in parsed.shapes] == [(q.says_size, q.says_position) for q in s.shapes]


def test_checker_scores_only_what_a_caption_says():
    from hicache.testbeds.flux_shapes.dataset import Variation

    scenes = [training_scene(3, i, Variation(**UNSAID)) for i in range(150)]
    results = [check(render(s), s.caption) for s in scenes]
    assert accuracy(results) >= 0.99
    for s, r in zip(scenes, results):
        assert ("size" in r) == s.shapes[0].says_size and ("position" in r) == s.shapes[0].says_position
        assert ("background_style" in r) == s.says_style
    # a stated position is still falsifiable when the size is unsaid
    scene = next(s for s in scenes if len(s.shapes) == 1 and s.shapes[0].says_position and not s.shapes[0].says_size)
    row, col = scene.shapes[0].cell
    from hicache.testbeds.flux_shapes.dataset import POSITIONS

    moved = POSITIONS[((row + 1) % 3, col)] if (row + 1) % 3 != row else POSITIONS[(row, (col + 1) % 3)]
    assert check(render(scene), scene.caption.replace(POSITIONS[scene.shapes[0].cell], moved))["position"] is False


def test_heldout_captions_follow_the_testbed_folder(tmp_path):
    import json

    from hicache.testbeds.flux_shapes.dataset import Variation, variation_of

    assert variation_of(tmp_path) == Variation()
    (tmp_path / "testbed.json").write_text(json.dumps({"data": UNSAID}))
    v = variation_of(tmp_path)
    assert v == Variation(**UNSAID)
    held = heldout_captions(32, seed=0, variation=v)
    assert held != heldout_captions(32, seed=0, variation=Variation()) and all(is_heldout(c) for c in held)


def test_clouds_vary_the_background_smoothly_and_leave_the_caption_and_checker_alone():
    from hicache.testbeds.flux_shapes.dataset import Variation

    from dataclasses import replace

    clouded = [training_scene(4, i, Variation(clouds=0.3)) for i in range(60)]
    plain = [replace(s, clouds=None) for s in clouded]
    assert [s.caption for s in plain] == [s.caption for s in clouded]  # the field is not in the caption
    assert training_scene(4, 0).clouds is None and len({s.clouds.seed for s in clouded}) == 60
    a, b = (np.asarray(render(s), dtype=np.float32) for s in (plain[0], clouded[0]))
    assert np.abs(a - b).mean() > 2 and (b <= a + 1).all()  # darkening only
    assert accuracy([check(render(s), s.caption) for s in clouded]) >= 0.95


def test_cloud_octaves_reach_finer_detail_and_survive_the_testbed_json(tmp_path):
    import json
    from dataclasses import asdict

    from hicache.testbeds.flux_shapes.dataset import Clouds, Variation, clouds_field, variation_of

    def fine_energy(field):  # energy left after a 4x4 box blur: detail finer than the x8 VAE's 8 px cells
        blurred = field.reshape(16, 4, 16, 4).mean(axis=(1, 3)).repeat(4, 0).repeat(4, 1)
        return float(((field - blurred) ** 2).mean())

    coarse = [fine_energy(clouds_field(Clouds(s, 0.3), 64)) for s in range(20)]
    fine = [fine_energy(clouds_field(Clouds(s, 0.3, (2, 4, 8, 16)), 64)) for s in range(20)]
    assert np.mean(fine) > 1.15 * np.mean(coarse)  # 1/f: the 16-cell octave carries 1/8 of the amplitude
    v = Variation(clouds=0.3, cloud_octaves=[2, 4, 8, 16])  # as Hydra passes it
    assert v.cloud_octaves == (2, 4, 8, 16) and training_scene(4, 0, v).clouds.octaves == (2, 4, 8, 16)
    (tmp_path / "testbed.json").write_text(json.dumps({"data": asdict(v)}))
    assert variation_of(tmp_path) == v
    assert training_scene(4, 0, Variation(clouds=0.3)).clouds.octaves == (2, 4, 8)  # older folders keep their data


def test_training_timestep_shift_is_the_schedulers_shift():
    import math

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from hicache.testbeds.flux_shapes.train import shift_timesteps

    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)
    assert torch.equal(shift_timesteps(t, 1.0), t)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    expected = sched.time_shift(1.15, 1.0, t)  # what FLUX samples at mu 1.15
    torch.testing.assert_close(shift_timesteps(t, math.exp(1.15)), expected)
    assert (shift_timesteps(t, 3.16) > t).all()  # more of training at high noise


def test_bad_cloud_octaves_and_timestep_shift_stop_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from hicache.testbeds.flux_shapes.dataset import Variation

    for bad in ([], [0, 4], [2.5]):
        with pytest.raises(ValueError, match="cloud_octaves"):
            Variation(clouds=0.3, cloud_octaves=bad)
    repo = Path(__file__).resolve().parents[1]
    for override in ("train.data.cloud_octaves=[]", "train.transformer.timestep_shift=0", "train.schedule_mu=fast",
                     "train.guidance.scale_min=0"):
        result = subprocess.run([sys.executable, "run.py", "experiment=testbed_train", override, "train.wandb.mode=disabled",
                                 f"train.out_dir={tmp_path / 'out'}", f"paths.outputs={tmp_path}"],
                                cwd=repo, capture_output=True, text=True, timeout=300)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("error: train: ") and override.split(".")[-1].split("=")[0] in lines[0]
