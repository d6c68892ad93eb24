"""The SR testbed's data sources: deterministic pairs, LR = x4 bicubic of HR, train and held-out disjoint."""

import pytest
import torch
import torch.nn.functional as F

from hicache.testbeds.inf_dit_sr import data as sr_data
from hicache.app.sr_experiment import SRSetupError, load_hr_images
from hicache.testbeds.flux_shapes.dataset import heldout_scenes, is_heldout, training_scene


def test_procedural_pairs_are_deterministic_and_lr_is_the_x4_bicubic_of_hr():
    first = sr_data.training_images("procedural", 6, 64, torch.Generator().manual_seed(0))
    again = sr_data.training_images("procedural", 6, 64, torch.Generator().manual_seed(99))
    assert first.shape == (6, 3, 64, 64) and torch.equal(first, again)
    hr, lr = sr_data.heldout_pairs(4, 64, "procedural")
    assert torch.equal(hr, sr_data.heldout_pairs(4, 64, "procedural")[0])
    expected = F.interpolate(hr, size=(16, 16), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    assert lr.shape == (4, 3, 16, 16) and torch.allclose(lr, expected)
    assert hr.std() > 0.05  # real scenes, not blank canvases


def test_procedural_train_and_heldout_sets_are_disjoint():
    train_captions = {training_scene(sr_data.PROCEDURAL_SEED, i).caption for i in range(256)}
    held = [s.caption for s in heldout_scenes(16, sr_data.PROCEDURAL_SEED)]
    assert all(is_heldout(c) for c in held) and not any(is_heldout(c) for c in train_captions)
    assert not train_captions & set(held)
    train = sr_data.training_images("procedural", 256, 64, torch.Generator())
    heldout = sr_data.heldout_images("procedural", 16, 64)
    distance = (train[:, None] - heldout[None]).abs().flatten(2).amax(-1)
    assert distance.min() > 0.1  # no held-out image appears among the training images


def test_mixed_source_holds_out_both_and_photos_hold_out_whole_photos():
    hr = sr_data.heldout_images("mixed", 4, 32)
    assert torch.equal(hr[:2], sr_data.heldout_images("procedural", 2, 32))
    assert torch.equal(hr[2:], sr_data.heldout_images("photos", 2, 32))
    assert not set(sr_data.TRAIN_PHOTOS) & set(sr_data.HELDOUT_PHOTOS)
    assert set(sr_data.heldout_description("mixed")) == {"procedural", "photos"}


def test_unknown_source_is_a_one_line_error():
    with pytest.raises(ValueError, match="data.source must be one of procedural, photos, mixed, got 'cats'"):
        sr_data.training_images("cats", 2, 64, torch.Generator())
    with pytest.raises(SRSetupError, match="data.source must be heldout, folder or one of"):
        load_hr_images("cats", 2, None, 64, 32)


def test_sr_table_heldout_images_follow_the_testbed_source():
    images = load_hr_images("heldout", 2, None, 64, 32, heldout_source="procedural")
    assert torch.equal(torch.stack(images), sr_data.heldout_images("procedural", 2, 64))


def test_relative_weights_favour_the_images_bicubic_already_gets_right():
    from hicache.testbeds.inf_dit_sr.train import relative_image_weights

    hr = sr_data.training_images("procedural", 32, 64, torch.Generator())
    lr = sr_data.downscale(hr)
    weights = relative_image_weights(hr, lr)
    up = F.interpolate(lr, size=(64, 64), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    bicubic_mse = (up - hr).pow(2).flatten(1).mean(1)
    assert weights.log().mean().abs() < 1e-4  # geometric mean 1: the learning rate keeps its meaning
    assert weights[bicubic_mse.argmin()] == weights.max() and weights[bicubic_mse.argmax()] == weights.min()
