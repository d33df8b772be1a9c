"""Each reward loads from tiny checkpoints in its published layout and computes what its official code computes.

References are written here from the official snippets (PickScore's README, torchmetrics' CLIP score, the aesthetic
predictor's simple_inference.py), on transformers' own processor and model calls, independently of our adapters.
HPSv2 and ImageReward, whose weights are converted, are checked in test_rewards_conversion.py.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from diffusers_di_star.rewards import AestheticReward, ClipScoreReward, PickScoreReward, load_reward
from diffusers_di_star.rewards.preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from diffusers_di_star.rewards.testing import save_tiny_aesthetic, save_tiny_clip

PROMPTS = ["a cat wearing sunglasses sitting on a red chair", "a futuristic city skyline at night with neon lights"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def aesthetic_folder(tmp_path_factory):
    return save_tiny_aesthetic(tmp_path_factory.mktemp("tiny-aesthetic"))


@pytest.fixture(scope="module")
def pil_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in PROMPTS]


def to_tensor(images):
    return torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images]).float() / 255


def image_features(model, pixel_values):
    features = model.get_image_features(pixel_values=pixel_values)
    return getattr(features, "pooler_output", features)  # a tensor before transformers 5


def text_features(model, tokens):
    features = model.get_text_features(**tokens)
    return getattr(features, "pooler_output", features)


def official_clip_cosine(folder, images, prompts):
    """PickScore's README snippet, up to the scale: processor -> get_*_features -> normalise -> dot."""
    processor = CLIPProcessor.from_pretrained(folder)
    model = CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        image_embeds = image_features(model, processor(images=images, return_tensors="pt")["pixel_values"])
        tokens = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_embeds = text_features(model, tokens)
    cosine = (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(-1)
    return cosine, model.logit_scale.exp().item()


def assert_differentiable(reward, images):
    images = images.clone().requires_grad_(True)
    reward(images, PROMPTS).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in reward.parameters())


def test_pickscore_matches_the_official_snippet(clip_folder, pil_images):
    reward = PickScoreReward.from_pretrained(model=clip_folder, processor=clip_folder)
    cosine, logit_scale = official_clip_cosine(clip_folder, pil_images, PROMPTS)
    scores = reward(to_tensor(pil_images), PROMPTS)
    torch.testing.assert_close(scores, logit_scale * cosine, atol=1e-4, rtol=1e-5)
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert (cosine.abs() > 0.05).all()  # the comparison is not between two near-zero numbers
    assert_differentiable(reward, to_tensor(pil_images))


def test_clip_score_is_100_cosine_without_clamp(clip_folder, pil_images):
    reward = ClipScoreReward.from_pretrained(model=clip_folder)
    cosine, _ = official_clip_cosine(clip_folder, pil_images, PROMPTS)
    scores = reward(to_tensor(pil_images), PROMPTS)
    torch.testing.assert_close(scores, 100 * cosine, atol=1e-3, rtol=1e-5)
    assert_differentiable(reward, to_tensor(pil_images))
    with torch.no_grad():
        reward.clip.text_projection.weight.neg_()  # flips every cosine's sign: negative scores are kept, not clamped
    torch.testing.assert_close(reward(to_tensor(pil_images), PROMPTS), -100 * cosine, atol=1e-3, rtol=1e-5)


def torchmetrics_clip_cosine(folder, images, prompts):
    """torchmetrics 1.9 ``_get_features``/``_clip_score_update``: ``processor(text, padding=True)`` without
    truncation, then ``input_ids`` and ``attention_mask`` cut to ``max_position_embeddings`` (77)."""
    processor = CLIPProcessor.from_pretrained(folder)
    model = CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        image_embeds = image_features(model, processor(images=images, return_tensors="pt")["pixel_values"])
        tokens = processor(text=prompts, return_tensors="pt", padding=True)
        limit = model.config.text_config.max_position_embeddings
        tokens = {name: tokens[name][..., :limit] for name in ("input_ids", "attention_mask")}
        text_embeds = text_features(model, tokens)
    return (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(-1)


def test_clip_score_cuts_long_prompts_as_torchmetrics(clip_folder, pil_images):
    prompts = ["a photo of a red fox in the snow at dawn, " * 12, "a bowl of ramen"]
    tokenizer = CLIPProcessor.from_pretrained(clip_folder).tokenizer
    assert len(tokenizer(prompts[0]).input_ids) > 77 >= len(tokenizer(prompts[1]).input_ids)
    expected = 100 * torchmetrics_clip_cosine(clip_folder, pil_images, prompts)
    default = ClipScoreReward.from_pretrained(model=clip_folder)(to_tensor(pil_images), prompts)
    torch.testing.assert_close(default, expected, atol=1e-3, rtol=1e-5)
    # truncation="clip" keeps the end-of-text token, as the tokenizer's own truncation does (the PickScore snippet).
    keep_eot = ClipScoreReward.from_pretrained(model=clip_folder, truncation="clip")(to_tensor(pil_images), prompts)
    official = 100 * official_clip_cosine(clip_folder, pil_images, prompts)[0]
    torch.testing.assert_close(keep_eot, official, atol=1e-3, rtol=1e-5)
    assert (keep_eot[0] - default[0]).abs() > 1  # the long prompt: the two cuts pool different tokens
    torch.testing.assert_close(keep_eot[1], default[1])  # the short one: identical
    with pytest.raises(ValueError, match=r"truncation \(how prompts over 77 tokens are cut\) must be one of"):
        load_reward("clip", clip={"model": clip_folder, "truncation": "end"})


def test_clip_score_on_other_sizes_stays_within_the_preprocessing_tolerance(clip_folder):
    rng = np.random.default_rng(1)
    small = [Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)) for _ in PROMPTS]
    # Smooth 401x300 images: resized to 299x224, an odd crop margin of 75 that the two rounding conventions split
    # differently; the torchvision rounding would be off by 0.07 to 0.19 here.
    images = [image.resize((401, 300), Image.BICUBIC) for image in small]
    reward = ClipScoreReward.from_pretrained(model=clip_folder)
    cosine, _ = official_clip_cosine(clip_folder, images, PROMPTS)
    torch.testing.assert_close(reward(to_tensor(images), PROMPTS), 100 * cosine, atol=0.03, rtol=0)


def test_aesthetic_matches_simple_inference(clip_folder, aesthetic_folder, pil_images):
    reward = AestheticReward.from_pretrained(model=aesthetic_folder, clip=clip_folder)
    model = CLIPModel.from_pretrained(clip_folder).eval()
    head = torch.load(f"{aesthetic_folder}/sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    # simple_inference.py: clip.load's preprocess (224x224 already: only normalise), encode_image, L2-normalise, MLP.
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        features = F.normalize(image_features(model, (to_tensor(pil_images) - mean) / std), dim=-1)
    for index in (0, 2, 4, 6, 7):
        features = F.linear(features, head[f"layers.{index}.weight"], head[f"layers.{index}.bias"])
    scores = reward(to_tensor(pil_images), ["prompts", "are ignored"])
    torch.testing.assert_close(scores, features.squeeze(-1), atol=1e-5, rtol=1e-5)
    assert scores[0] != scores[1]
    assert_differentiable(reward, to_tensor(pil_images))


def test_rewards_follow_to_device_and_dtype(clip_folder, pil_images):
    reward = PickScoreReward.from_pretrained(model=clip_folder, processor=clip_folder)
    expected = reward(to_tensor(pil_images), PROMPTS)
    reward.to(dtype=torch.float64)
    assert reward.dtype == torch.float64
    torch.testing.assert_close(reward(to_tensor(pil_images), PROMPTS), expected, atol=1e-4, rtol=1e-5)
    reward.to(dtype=torch.bfloat16)
    assert torch.isfinite(reward(to_tensor(pil_images), PROMPTS)).all()


def test_load_reward_sums_the_real_adapters(clip_folder, aesthetic_folder, pil_images):
    reward = load_reward(
        "pickscore:2,aesthetic:-0.5",
        pickscore={"model": clip_folder, "processor": clip_folder},
        aesthetic={"model": aesthetic_folder, "clip": clip_folder},
    )
    images = to_tensor(pil_images)
    components = reward.components(images, PROMPTS)
    pickscore = PickScoreReward.from_pretrained(model=clip_folder, processor=clip_folder)(images, PROMPTS)
    aesthetic = AestheticReward.from_pretrained(model=aesthetic_folder, clip=clip_folder)(images, PROMPTS)
    torch.testing.assert_close(components["pickscore"], pickscore)
    torch.testing.assert_close(reward(images, PROMPTS), 2 * pickscore - 0.5 * aesthetic)
    assert reward.differentiable
