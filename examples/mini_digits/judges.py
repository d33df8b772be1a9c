"""Independent judges of generated digits: a CNN classifier trained on real digits, and the study's metrics.

The classifier is never a reward (the reward is ``boldness``, a pixel statistic), so a generator cannot be trained
against its judge. Metrics, each on grey-scale images in [0, 1]:

* prompt accuracy: the fraction of images the classifier labels as the prompted digit;
* Fréchet distance (FD) to held-out real digits in the classifier's 64-d penultimate feature space,
  ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}) (FID's formula with this network in place of Inception);
* within-class diversity: mean pairwise feature distance between images of the same prompt, averaged over classes.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitClassifier", "frechet_distance", "train_classifier", "within_class_diversity"]


class DigitClassifier(nn.Module):
    """conv-pool ×2 → 64-d features → 10 logits; input ``[N, 1, R, R]`` in [0, 1], any R ≥ 8 (adaptive pooling)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(32 * 16, 64), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features ``[N, 64]``, predicted labels ``[N]``)."""
        features = torch.cat([self.features(chunk) for chunk in images.split(500)])
        return features, self.head(features).argmax(1)


def train_classifier(images, labels, steps: int = 600, batch_size: int = 64, seed: int = 0) -> DigitClassifier:
    """Adam on cross-entropy with ±2-pixel random shifts; deterministic under ``seed``."""
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        dx, dy = torch.randint(-2, 3, (2,), generator=generator).tolist()
        batch = torch.roll(images[index], shifts=(dy, dx), dims=(2, 3))
        loss = nn.functional.cross_entropy(model(batch), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FD between Gaussians fitted to two feature sets (float64; symmetric PSD square roots by eigh)."""
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross))


def within_class_diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the mean pairwise Euclidean feature distance among that class's samples."""
    values = []
    for label in labels.unique():
        group = features[labels == label]
        if len(group) > 1:
            distances = torch.cdist(group, group)
            values.append(distances.sum() / (len(group) * (len(group) - 1)))
    return float(torch.stack(values).mean())
