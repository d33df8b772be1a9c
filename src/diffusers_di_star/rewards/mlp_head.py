"""The linear MLP head of the LAION aesthetic predictor v2 and of ImageReward (same layout, same weight names)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["PreferenceMLP"]


class PreferenceMLP(nn.Module):
    """``input_size -> 1024 -> 128 -> 64 -> 16 -> 1`` linear layers with dropouts and no activations.

    The layout of ``MLP`` in christophschuhmann/improved-aesthetic-predictor and THUDM/ImageReward: its state dict
    (``layers.{0,2,4,6,7}.{weight,bias}``) loads as is. Dropout is inactive in eval mode, where rewards always are.
    """

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> PreferenceMLP:
        """The head with these weights (input size read from ``layers.0.weight``); other names are an error."""
        if "layers.0.weight" not in state_dict:
            raise ValueError(
                f"Not a preference MLP state dict (no 'layers.0.weight'); its names: {sorted(state_dict)[:8]}."
            )
        head = cls(state_dict["layers.0.weight"].shape[1])
        head.load_state_dict(state_dict)
        return head

    def forward(self, features):
        return self.layers(features).squeeze(-1)
