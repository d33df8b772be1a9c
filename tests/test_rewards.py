"""The reward interface, the weighted sum, the spec parser, the tensor preprocessing and safe checkpoint loading.

The adapters on tiny checkpoints are in test_rewards_adapters.py, the checkpoint conversions in
test_rewards_conversion.py.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from diffusers_di_star.rewards import (
    REWARDS,
    ClipImageTransform,
    RewardModel,
    WeightedSumReward,
    load_reward,
    parse_reward_spec,
    register_reward,
)
from diffusers_di_star.rewards.checkpoints import resolve_checkpoint_file
from diffusers_di_star.rewards.preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from diffusers_di_star.rewards.registry import RewardEntry
from diffusers_di_star.weights import load_state_dict_file

BUILT_IN = ["aesthetic", "boldness", "clip", "hpsv2", "hpsv2.1", "imagereward", "pickscore"]


class MeanBrightness(RewardModel):
    """A differentiable stub: ``gain * mean pixel``."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(2.0))
        self.dropout = nn.Dropout(0.5)
        self.freeze()

    def score(self, images, prompts):
        return self.dropout(self.gain * images.mean(dim=(1, 2, 3)))


class PromptLength(RewardModel):
    """A non-differentiable stub: the number of characters of each prompt."""

    differentiable = False

    def score(self, images, prompts):
        return torch.tensor([float(len(prompt)) for prompt in prompts])


@pytest.fixture
def stub_rewards(monkeypatch):
    """Replace two built-in entries by stubs that record whether they were loaded."""
    loaded = []

    def loader(name, cls):
        def load():
            loaded.append(name)
            return cls()

        return load

    monkeypatch.setitem(REWARDS, "pickscore", RewardEntry(loader("pickscore", MeanBrightness)))
    monkeypatch.setitem(REWARDS, "clip", RewardEntry(loader("clip", PromptLength)))
    return loaded


# ----------------------------------------------------------------------------------------------- interface


def test_reward_is_frozen_and_stays_in_eval_mode():
    reward = MeanBrightness()
    assert not any(parameter.requires_grad for parameter in reward.parameters())
    reward.train()
    assert not reward.training and not reward.dropout.training
    images = torch.full((4, 3, 8, 8), 0.25)
    torch.testing.assert_close(reward(images, ["a"] * 4), torch.full((4,), 0.5))  # dropout never fires


def test_gradients_reach_pixels_and_not_parameters():
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    MeanBrightness()(images, ["a", "b"]).sum().backward()
    torch.testing.assert_close(images.grad, torch.full_like(images, 2.0 / (3 * 8 * 8)))


def test_non_differentiable_reward_runs_without_grad():
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    scores = PromptLength()(images, ["abc", "hello"])
    assert not scores.requires_grad
    torch.testing.assert_close(scores, torch.tensor([3.0, 5.0]))


@pytest.mark.parametrize(
    ("images", "prompts", "error", "message"),
    [
        (torch.rand(3, 8, 8), ["a"], ValueError, r"\(B, 3, H, W\).*\(3, 8, 8\)"),
        (torch.rand(1, 4, 8, 8), ["a"], ValueError, r"\(1, 4, 8, 8\)"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["a"], ValueError, "torch.uint8.*divide uint8 by 255"),
        (torch.rand(2, 3, 8, 8), ["a"], ValueError, "2 images but 1 prompts"),
        (torch.rand(1, 3, 8, 8), "a", TypeError, "list of strings"),
    ],
)
def test_invalid_inputs_are_rejected(images, prompts, error, message):
    with pytest.raises(error, match=message):
        MeanBrightness()(images, prompts)


def test_weighted_sum_value_components_and_flag():
    total = WeightedSumReward({"brightness": (3.0, MeanBrightness()), "length": (-0.5, PromptLength())})
    images = torch.full((2, 3, 4, 4), 0.5)
    prompts = ["abcd", "ab"]
    components = total.components(images, prompts)
    assert list(components) == ["brightness", "length"]
    torch.testing.assert_close(components["length"], torch.tensor([4.0, 2.0]))
    torch.testing.assert_close(total(images, prompts), torch.tensor([3 * 1.0 - 0.5 * 4, 3 * 1.0 - 0.5 * 2]))
    assert total.differentiable is False  # one component is not
    assert WeightedSumReward({"brightness": (1.0, MeanBrightness())}).differentiable is True
    assert "brightness: 3, length: -0.5" in repr(total)


def test_weighted_sum_needs_a_reward():
    with pytest.raises(ValueError, match="at least one reward"):
        WeightedSumReward({})


# ----------------------------------------------------------------------------------------------- registry


def test_parse_reward_spec():
    assert parse_reward_spec("pickscore:100,hpsv2.1:1") == {"pickscore": 100.0, "hpsv2.1": 1.0}
    assert parse_reward_spec(" PickScore : 2.5 , aesthetic ") == {"pickscore": 2.5, "aesthetic": 1.0}
    assert parse_reward_spec("imagereward:-1e-1") == {"imagereward": -0.1}


def test_built_in_rewards_are_registered():
    assert sorted(REWARDS) == BUILT_IN


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pickscore:1,hsp:2", "Unknown reward 'hsp'.*valid names: " + ", ".join(BUILT_IN).replace(".", r"\.")),
        ("pickscore:abc", "Bad weight 'abc' for reward 'pickscore'"),
        ("pickscore:nan", "Bad weight 'nan'"),
        ("pickscore:inf", "Bad weight 'inf'"),
        ("pickscore:0", "Bad weight '0'.*finite non-zero"),
        ("pickscore:1,pickscore:2", "'pickscore' appears twice"),
        ("pickscore:1,", "Empty reward name"),
        ("", "Empty reward name"),
    ],
)
def test_bad_specs_fail_before_loading(stub_rewards, spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward(spec)
    assert stub_rewards == []


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"hpsv2": {"checkpoint": "x"}}, ValueError, r"Options given for 'hpsv2', which is not in the spec"),
        ({"pickscore": {"modle": "x"}}, ValueError, r"Bad options \{'modle': 'x'\} for reward 'pickscore'"),
        ({"pickscore": "folder"}, TypeError, "must be a dict of loader arguments"),
    ],
)
def test_bad_options_fail_before_loading(stub_rewards, options, error, message):
    with pytest.raises(error, match=message):
        load_reward("clip:1,pickscore:1", **options)
    assert stub_rewards == []


def test_options_name_the_accepted_arguments():
    with pytest.raises(ValueError, match="it accepts: model, processor"):
        load_reward("pickscore", pickscore={"checkpoint": "x"})


def test_missing_extras_fail_before_loading(stub_rewards, monkeypatch):
    monkeypatch.setitem(REWARDS, "needs-extra", None)  # so that the entry is removed after the test
    register_reward("needs-extra", MeanBrightness, requires=("torch", "surely_not_installed.submodule"))
    with pytest.raises(ImportError, match="needs-extra needs surely_not_installed.submodule"):
        load_reward("pickscore:1,needs-extra:1")
    assert stub_rewards == []


def test_load_reward_builds_the_weighted_sum_on_device_and_dtype(stub_rewards):
    reward = load_reward("pickscore:2,clip:-1", dtype=torch.float64)
    assert isinstance(reward, WeightedSumReward) and stub_rewards == ["pickscore", "clip"]
    assert reward.weights == {"pickscore": 2.0, "clip": -1.0}
    assert reward.dtype == torch.float64
    images = torch.full((1, 3, 4, 4), 0.25, dtype=torch.float64)
    torch.testing.assert_close(reward(images, ["abc"]), torch.tensor([2 * 0.5 - 3.0]))


@pytest.mark.parametrize("name", ["Upper", "a:b", "a,b", " padded"])
def test_register_reward_rejects_names_the_spec_cannot_hold(name):
    with pytest.raises(ValueError, match="lower case without ',' or ':'"):
        register_reward(name, MeanBrightness)


# ----------------------------------------------------------------------------------------------- preprocessing
# Tolerance of the tensor path against PIL (per pixel, before normalisation): PIL rounds to uint8 after each of its
# two resize passes, we do not, so single pixels differ by up to about one grey level and by a quarter of one on
# average. The torch antialiased bicubic kernel is PIL's (a = -0.5), so nothing else differs.
MAX_PIXEL_ERROR, MEAN_PIXEL_ERROR = 1.5 / 255, 0.5 / 255
STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)


def pil_image(height, width, kind, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    small = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def to_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0).float() / 255


@pytest.mark.parametrize("kind", ["smooth", "noise"])
@pytest.mark.parametrize(("height", "width"), [(256, 320), (300, 200), (100, 150), (512, 512), (224, 231)])
def test_tensor_preprocessing_matches_the_clip_image_processor(height, width, kind):
    processor = CLIPImageProcessorPil()
    image = pil_image(height, width, kind)
    expected = processor(images=image, return_tensors="pt")["pixel_values"]
    actual = ClipImageTransform.from_image_processor(processor)(to_tensor(image))
    assert actual.shape == expected.shape == (1, 3, 224, 224)
    pixel_error = ((actual - expected) * STD).abs()
    assert pixel_error.max() <= MAX_PIXEL_ERROR
    assert pixel_error.mean() <= MEAN_PIXEL_ERROR


def torchvision_style_reference(image, size=224):
    """``Resize(size, BICUBIC)`` (PIL) + ``CenterCrop(size)`` with torchvision's rounded offsets + normalise."""
    width, height = image.size
    resized_long = int(size * max(width, height) / min(width, height))
    new_width, new_height = (size, resized_long) if width <= height else (resized_long, size)
    pixels = to_tensor(image.resize((new_width, new_height), Image.BICUBIC))
    top, left = int(round((new_height - size) / 2)), int(round((new_width - size) / 2))
    return (pixels[..., top : top + size, left : left + size] - MEAN) / STD


@pytest.mark.parametrize(("height", "width"), [(224, 227), (227, 224), (331, 240), (64, 64)])
def test_tensor_preprocessing_matches_torchvision_crop_rounding(height, width):
    image = pil_image(height, width, "noise", seed=1)
    expected = torchvision_style_reference(image)
    pixel_error = ((ClipImageTransform.torchvision(224)(to_tensor(image)) - expected) * STD).abs()
    assert pixel_error.max() <= MAX_PIXEL_ERROR and pixel_error.mean() <= MEAN_PIXEL_ERROR


def test_crop_rounding_matters_on_odd_margins():
    # 227 - 224 = 3: transformers crops from column 1, torchvision from round(1.5) = 2.
    image = to_tensor(pil_image(224, 227, "noise"))
    floor = ClipImageTransform(size=224, crop_size=(224, 224), crop_rounding="floor")(image)
    rounded = ClipImageTransform.torchvision(224)(image)
    torch.testing.assert_close(floor, (image[..., :, 1:225] - MEAN) / STD)
    torch.testing.assert_close(rounded, (image[..., :, 2:226] - MEAN) / STD)


def test_tensor_preprocessing_is_differentiable_and_keeps_the_batch():
    images = torch.rand(3, 3, 96, 64, requires_grad=True)
    out = ClipImageTransform.torchvision(32)(images)
    assert out.shape == (3, 3, 32, 32)
    out.sum().backward()
    assert images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()


def test_unsupported_image_processor_is_refused():
    with pytest.raises(ValueError, match=r"resample \(must be bicubic, 3\)"):
        ClipImageTransform.from_image_processor(CLIPImageProcessorPil(resample=Image.BILINEAR))
    with pytest.raises(ValueError, match="crop_rounding must be 'floor'"):
        ClipImageTransform(size=224, crop_size=(224, 224), crop_rounding="ceil")


# ----------------------------------------------------------------------------------------------- checkpoints


class CodeOnLoad:
    """Pickles as a call that would create ``path`` when unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": torch.zeros(1), "payload": CodeOnLoad(str(marker))}, path)
    with pytest.raises(ValueError, match="not a plain state dict.*weights_only=True"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    torch.save({"weight": torch.zeros(2), "step": 3}, tmp_path / "mixed.pt")
    for name in ("list.pt", "mixed.pt"):
        with pytest.raises(ValueError, match="not a state dict"):
            load_state_dict_file(tmp_path / name)


def test_state_dicts_load_from_pickles_wrappers_and_safetensors(tmp_path):
    weights = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    torch.save(weights, tmp_path / "plain.pt")
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "wrapped.pt")
    save_file(weights, tmp_path / "weights.safetensors")
    for name in ("plain.pt", "wrapped.pt", "weights.safetensors"):
        loaded = load_state_dict_file(tmp_path / name)
        assert loaded.keys() == weights.keys()
        assert all(torch.equal(loaded[key], weights[key]) for key in weights)


def test_resolve_checkpoint_file(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    assert resolve_checkpoint_file(tmp_path / "model.pt", "other.pt") == os.fspath(tmp_path / "model.pt")
    assert resolve_checkpoint_file(tmp_path, "model.pt") == os.fspath(tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="without 'missing.pt'"):
        resolve_checkpoint_file(tmp_path, "missing.pt")
