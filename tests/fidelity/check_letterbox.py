"""Compare LetterboxImageTransform with hpsv2 1.2.0's own preprocess_val (its vendored open_clip transform.py),
run with the real torchvision, on PIL images of several sizes. Also the old transform, for the record."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from hpsv2_transform.transform import image_transform
from PIL import Image

spec = importlib.util.spec_from_file_location(
    "pre", Path(__file__).resolve().parents[2] / "src/diffusers_di_star/rewards/preprocessing.py"
)
pre = importlib.util.module_from_spec(spec)
sys.modules["pre"] = pre
spec.loader.exec_module(pre)
# as factory.create_model_and_transforms(light_augmentation=True): image_size (224, 224), default mean/std
preprocess_val = image_transform((224, 224), is_train=False, mean=None, std=None, resize_longest_max=True)
print(preprocess_val)
ours, old = pre.LetterboxImageTransform(224), pre.ClipImageTransform.torchvision(224)
std = torch.tensor(pre.OPENAI_CLIP_STD).view(1, 3, 1, 1)
rng = np.random.default_rng(0)
worst = 0
for h, w in [
    (1024, 1024),
    (512, 512),
    (1024, 768),
    (768, 1024),
    (1000, 333),
    (333, 1000),
    (300, 200),
    (100, 150),
    (57, 91),
    (225, 224),
    (224, 224),
    (896, 1152),
    (1152, 896),
    (1344, 768),
]:
    for kind in ("noise", "smooth"):
        if kind == "noise":
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            a = np.array(
                Image.fromarray(rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)).resize(
                    (w, h), Image.BICUBIC
                )
            )
        img = Image.fromarray(a)
        ref = preprocess_val(img).unsqueeze(0)
        x = torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0).float() / 255
        got = ours(x)
        err = ((got - ref) * std).abs().max().item()
        olderr = ((old(x) - ref) * std).abs().max().item()
        worst = max(worst, err)
        print(
            f"{h}x{w} {kind}: shape {tuple(ref.shape)} max |ours - hpsv2| = {err * 255:.2e}/255"
            f"  (old crop transform: {olderr * 255:.1f}/255)"
        )
print("torch", torch.__version__, "torchvision", torchvision.__version__, "worst", worst * 255, "/255")
