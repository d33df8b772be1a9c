"""ClipScoreReward vs torchmetrics 1.9.0's own _clip_score_update on a tiny CLIP, prompts over 77 tokens."""

import tempfile

import numpy as np
import torch
import torchmetrics
from torchmetrics.functional.multimodal.clip_score import _clip_score_update
from transformers import CLIPModel, CLIPProcessor

from diffusers_di_star.rewards import ClipScoreReward
from diffusers_di_star.rewards.testing import save_tiny_clip

folder = save_tiny_clip(tempfile.mkdtemp())
model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
prompts = ["a photo of a red fox in the snow " * 12, "a bowl of ramen with an egg, chopsticks, steam " * 8, "a cat"]
print("token counts", [len(processor.tokenizer(p).input_ids) for p in prompts])
rng = np.random.default_rng(0)
images = torch.from_numpy(rng.integers(0, 256, (3, 3, 224, 224), dtype=np.uint8))
# transformers 5 returns output objects from get_*_features; torchmetrics 1.9.0 expects tensors: unwrap them.
for name in ("get_image_features", "get_text_features"):
    original = getattr(model, name)
    setattr(model, name, lambda *a, _f=original, **k: _f(*a, **k).pooler_output)
with torch.no_grad():
    expected, _ = _clip_score_update(list(images), prompts, model, processor)
for truncation in ("torchmetrics", "clip"):
    reward = ClipScoreReward.from_pretrained(folder, truncation=truncation)
    got = reward(images.float() / 255, prompts)
    print(truncation, got.tolist(), "torchmetrics", expected.tolist(), "max diff", (got - expected).abs().max().item())
print("torchmetrics", torchmetrics.__version__)
