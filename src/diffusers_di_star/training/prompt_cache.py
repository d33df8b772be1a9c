"""Precomputed prompt embeddings: every training prompt encoded once, so the text encoders can leave the GPU.

DI* is data-free (prompts only), so a run's whole conditioning is a function of its prompt set. As Diffusers' SD3 and
FLUX training scripts precompute prompt embeddings, :meth:`PromptEmbeddingCache.build` runs the family's
``encode`` over the prompts once; :meth:`PromptEmbeddingCache.encode` then answers the trainer's per-step calls by
lookup (same signature and result as ``family.encode``). A tensor whose rows are all equal (∅'s embeddings, SDXL's
``add_time_ids``) is kept once. The cache is saved as safetensors (atomically) with what it was built from, and a
resumed run reuses it when those match (docs/training.md, "Precomputed prompt embeddings").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file

__all__ = ["PromptEmbeddingCache"]


class PromptEmbeddingCache:
    """The conditioning of each prompt in a fixed set, on the CPU; ``encode`` returns a family's conditioning.

    Args:
        prompts: the prompt set (duplicates allowed; each distinct prompt is stored once).
        rows: per field of the conditioning dataclass, a tensor ``[len(unique prompts), ...]``, or ``[1, ...]`` for a
            field shared by every prompt.
        conditioning_class: the family's conditioning dataclass (e.g. ``SD3Conditioning``).
        key: what the embeddings were built from (model, family, resolution, prompts); a saved cache is reused only
            under the same key.
    """

    def __init__(self, prompts: Sequence[str], rows: dict[str, torch.Tensor], conditioning_class: type, key: dict):
        self.index = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}
        self.rows = rows
        self.conditioning_class = conditioning_class
        self.key = key
        self.device = torch.device("cpu")

    @classmethod
    def load_or_build(cls, path: str, family, prompts: Sequence[str], resolution: int, model: str):
        """The cache saved at ``path`` when it was built from the same model, family, resolution and prompts (a
        resumed run), else a new one, built with ``family.encode`` and saved there."""
        key = cls.make_key(model, family, resolution, prompts)
        conditioning_class = type(family.encode(list(prompts[:1]), resolution))
        cache = cls.load(path, conditioning_class, key)
        if cache is None:
            cache = cls.build(family, prompts, resolution, key)
            cache.save(path)
        return cache

    def to(self, device) -> PromptEmbeddingCache:
        """Where :meth:`encode` puts the conditionings (the rows stay on the CPU)."""
        self.device = torch.device(device)
        return self

    @staticmethod
    def make_key(model: str, family, resolution: int, prompts: Sequence[str]) -> dict:
        digest = hashlib.sha256(json.dumps(sorted(set(prompts))).encode()).hexdigest()
        return {"model": model, "family": family.name, "resolution": resolution, "prompts_sha256": digest}

    @classmethod
    @torch.no_grad()
    def build(cls, family, prompts: Sequence[str], resolution: int, key: dict, batch_size: int = 32):
        """Encode each distinct prompt once with ``family.encode`` (its text encoders where they are) and keep the
        results on the CPU."""
        unique = list(dict.fromkeys(prompts))
        batches = [family.encode(unique[i : i + batch_size], resolution) for i in range(0, len(unique), batch_size)]
        rows = {}
        for field in dataclasses.fields(batches[0]):
            tensor = torch.cat([getattr(batch, field.name) for batch in batches]).cpu()
            shared = bool((tensor == tensor[:1]).all())
            rows[field.name] = (tensor[:1] if shared else tensor).contiguous()
        return cls(unique, rows, type(batches[0]), key)

    def encode(self, prompts: Sequence[str], resolution: int):
        """``family.encode(prompts, resolution)`` by lookup, on :attr:`device`."""
        if resolution != self.key["resolution"]:
            raise ValueError(
                f"the prompt embeddings were built at resolution {self.key['resolution']}, not {resolution}"
            )
        missing = [prompt for prompt in prompts if prompt not in self.index]
        if missing:
            raise KeyError(f"prompt {missing[0]!r} is not in the precomputed prompt embeddings.")
        ids = torch.tensor([self.index[prompt] for prompt in prompts])
        fields = {}
        for name, tensor in self.rows.items():
            picked = tensor.expand(len(prompts), *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor[ids]
            fields[name] = picked.to(self.device)
        return self.conditioning_class(**fields)

    def save(self, path: str) -> None:
        """Write the cache as safetensors (via a temporary file and a rename: a killed save leaves the old file)."""
        metadata = {"key": json.dumps(self.key, sort_keys=True), "prompts": json.dumps(list(self.index))}
        temporary = f"{path}.tmp"
        save_file(self.rows, temporary, metadata=metadata)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str, conditioning_class: type, key: dict) -> PromptEmbeddingCache | None:
        """The cache saved at ``path`` if it exists and was built under ``key``; ``None`` otherwise."""
        if not os.path.isfile(path):
            return None
        from safetensors import safe_open

        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
        if metadata.get("key") != json.dumps(key, sort_keys=True):
            return None
        return cls(json.loads(metadata["prompts"]), load_file(path), conditioning_class, key)
