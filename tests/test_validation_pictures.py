"""Pictures of a training run: the validation grid of each step and the model card's progression across steps."""

import argparse

import numpy as np
import pytest
from PIL import Image
from test_training_script import load_script

from diffusers_di_star import DIStarSDXLPipeline
from diffusers_di_star.hub import write_model_card


@pytest.fixture(scope="module")
def script():
    return load_script()


def _random_png(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_validation_grid_is_the_step_images_side_by_side(script, tiny_components, tmp_path, one_thread):
    args = argparse.Namespace(validation_prompts=["a cat", "a red chair", "a fox"], seed=3, resolution=64)
    pipe = DIStarSDXLPipeline(**tiny_components, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    paths = script.validate(args, pipe, str(tmp_path / "step-2"))
    grid = np.asarray(Image.open(tmp_path / "step-2" / "grid.png"))
    images = [np.asarray(Image.open(path)) for path in paths]
    np.testing.assert_array_equal(grid, np.concatenate(images, axis=1))  # one row: the prompts, left to right
    assert grid.shape == (64, 3 * 64, 3)
    assert not np.array_equal(images[0], images[1])  # the prompts differ, so a repeated tile would show


def test_model_card_shows_the_final_grid_and_the_progression_in_step_order(tmp_path):
    grids = {step: _random_png(tmp_path / "validation" / f"step-{step}" / "grid.png", (96, 32), step)
             for step in (10, 1, 2)}
    _random_png(tmp_path / "validation" / "step-5" / "grid.png", (64, 32), 5)  # another size: left out
    final = tmp_path / "images" / "000.png"
    _random_png(final, (32, 32), 0)
    _random_png(tmp_path / "images" / "grid.png", (96, 32), 9)
    write_model_card(str(tmp_path), "base", None, None, hyperparameters={}, lora=True, images=[str(final)])
    card = (tmp_path / "README.md").read_text()
    assert "## Samples" in card and "after training](images/grid.png)" in card and "](images/000.png)" not in card
    assert "(steps 1, 2, 10, top to bottom)](validation/progression.png)" in card
    progression = np.asarray(Image.open(tmp_path / "validation" / "progression.png"))
    np.testing.assert_array_equal(progression, np.concatenate([grids[1], grids[2], grids[10]], axis=0))


def test_model_card_without_validation_has_no_samples_section(tmp_path):
    write_model_card(str(tmp_path), "base", None, None, hyperparameters={}, lora=False)
    assert "## Samples" not in (tmp_path / "README.md").read_text()
