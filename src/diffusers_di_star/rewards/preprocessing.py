"""CLIP-style image preprocessing on tensors, differentiable: the two recipes the scorers here were trained with.

:class:`ClipImageTransform`, "resize the shortest side with bicubic filtering, centre crop, normalise", on PIL
images: transformers' ``CLIPImageProcessor`` (PickScore, CLIP score) and torchvision's ``Resize`` + ``CenterCrop``
(OpenAI CLIP for the LAION aesthetic predictor, BLIP/ImageReward). It follows PIL closely:

* the output size is PIL's and transformers' (``long = int(size * long / short)``);
* PIL resizes the width first, then the height, rounding to uint8 (so clipping to ``[0, 255]``) after each pass: we
  resize the same two passes with torch's antialiased bicubic filter (the same ``a = -0.5`` kernel as PIL) and clamp
  to ``[0, 1]`` after each;
* the crop offset is ``(size - crop) // 2`` in transformers and ``round((size - crop) / 2)`` in torchvision, which
  differ by one pixel when the margin is odd: ``crop_rounding`` picks the one the scorer was trained with.

For a PIL image converted to a tensor, the result matches the reference processor within 1.5/255 per pixel (before
normalisation) and 0.5/255 on average: what is left is the uint8 rounding PIL does after each pass.

:class:`LetterboxImageTransform`, HPSv2's: ``hpsv2.score`` builds its model with ``light_augmentation=True``, whose
eval transform (``ResizeMaxSize`` in hpsv2's copy of open_clip, ``hpsv2/src/open_clip/transform.py``) works on the
float tensor of ``ToTensor``: one bicubic resize of the *longest* side to ``size`` (torchvision's tensor resize, i.e.
``F.interpolate(mode="bicubic", antialias=True)``, not clamped), zero padding of the short side to a square, split
evenly with the odd pixel at the bottom/right, then normalisation. That is all tensor arithmetic, so it is matched to
float precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "ClipImageTransform", "LetterboxImageTransform"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_BICUBIC = 3


@dataclass(frozen=True)
class ClipImageTransform:
    """``images`` float ``(B, 3, H, W)`` in ``[0, 1]`` -> normalised ``(B, 3, crop_height, crop_width)``."""

    size: int
    crop_size: tuple[int, int]
    mean: Sequence[float] = OPENAI_CLIP_MEAN
    std: Sequence[float] = OPENAI_CLIP_STD
    crop_rounding: Literal["floor", "round"] = "floor"

    def __post_init__(self):
        if self.crop_rounding not in ("floor", "round"):
            raise ValueError(
                f"crop_rounding must be 'floor' (transformers) or 'round' (torchvision), got {self.crop_rounding!r}."
            )
        if min(self.crop_size) > self.size:
            raise ValueError(f"crop_size {self.crop_size} is larger than the resized shortest side {self.size}.")

    @classmethod
    def torchvision(cls, size: int) -> ClipImageTransform:
        """``Resize(size, BICUBIC)``, ``CenterCrop(size)``, OpenAI CLIP mean/std: OpenAI CLIP, BLIP."""
        return cls(size=size, crop_size=(size, size), crop_rounding="round")

    @classmethod
    def from_image_processor(cls, processor) -> ClipImageTransform:
        """The transform a transformers ``CLIPImageProcessor`` applies (shortest-edge resize, centre crop)."""
        unsupported = {
            "do_resize": processor.do_resize is not True,
            "do_center_crop": processor.do_center_crop is not True,
            "do_normalize": processor.do_normalize is not True,
            "resample (must be bicubic, 3)": int(processor.resample) != _PIL_BICUBIC,
            "size (must be {'shortest_edge': N})": not processor.size.get("shortest_edge"),
        }
        if any(unsupported.values()):
            bad = [name for name, is_bad in unsupported.items() if is_bad]
            raise ValueError(f"Unsupported image processor settings {bad} in {processor!r}.")
        crop = processor.crop_size
        return cls(
            size=int(processor.size["shortest_edge"]),
            crop_size=(int(crop["height"]), int(crop["width"])),
            mean=tuple(processor.image_mean),
            std=tuple(processor.image_std),
            crop_rounding="floor",
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(0, 1)
        height, width = x.shape[-2:]
        short, long = sorted((height, width))
        resized_long = int(self.size * long / short)
        new_height, new_width = (self.size, resized_long) if height <= width else (resized_long, self.size)
        if new_width != width:
            x = _bicubic(x, (height, new_width))
        if new_height != height:
            x = _bicubic(x, (new_height, new_width))
        return _normalize(self._center_crop(x), self.mean, self.std)

    def _center_crop(self, x: torch.Tensor) -> torch.Tensor:
        crop_height, crop_width = self.crop_size
        top = _crop_offset(x.shape[-2] - crop_height, self.crop_rounding)
        left = _crop_offset(x.shape[-1] - crop_width, self.crop_rounding)
        return x[..., top : top + crop_height, left : left + crop_width]


@dataclass(frozen=True)
class LetterboxImageTransform:
    """``images`` float ``(B, 3, H, W)`` in ``[0, 1]`` -> normalised ``(B, 3, size, size)``, as hpsv2's eval transform.

    ``ResizeMaxSize(size, fill=0)`` of hpsv2 1.2.0: ``scale = size / max(H, W)``; unless ``scale == 1``, resize to
    ``(round(H * scale), round(W * scale))`` (Python's ``round``) with torchvision's antialiased bicubic on the float
    tensor, without clamping, and pad with ``fill`` (before normalisation, so black) by ``pad // 2`` on the top/left
    and the rest on the bottom/right. hpsv2 leaves a non-square image whose longest side is already ``size`` unpadded
    (its model then gets a non-square input, which fixed position embeddings do not fit); here it is padded.
    """

    size: int
    mean: Sequence[float] = OPENAI_CLIP_MEAN
    std: Sequence[float] = OPENAI_CLIP_STD
    fill: float = 0.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(0, 1)
        height, width = x.shape[-2:]
        scale = self.size / float(max(height, width))
        if scale != 1.0:
            new_size = (round(height * scale), round(width * scale))
            x = F.interpolate(x, size=new_size, mode="bicubic", antialias=True, align_corners=False)
        pad_height, pad_width = self.size - x.shape[-2], self.size - x.shape[-1]
        padding = (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2)
        x = F.pad(x, padding, value=self.fill)
        return _normalize(x, self.mean, self.std)


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def _bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # One PIL pass: antialiased bicubic, then the clipping that PIL's rounding to uint8 does.
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def _crop_offset(margin: int, rounding: str) -> int:
    return margin // 2 if rounding == "floor" else int(round(margin / 2))
