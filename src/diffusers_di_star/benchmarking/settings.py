"""What a benchmark run measures, with defaults that depend on the device (full size on CUDA, reduced on a CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime import default_device, default_dtype
from ..weights import DTYPES
from .components import SIZES, ModelSize

__all__ = ["COMPILE_MODES", "QUICK", "TRAINING_LAYOUTS", "BenchSettings"]

#: ``torch.compile`` modes for the fast inference settings (``None``: no compilation).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: Layouts of the three DI* networks (generator, assistant, reference), as ``training.build_networks`` builds them.
TRAINING_LAYOUTS = {
    "three-in-one": "ONE UNet: generator and assistant are two LoRA adapters on it, the reference is the same UNet "
    "with its adapters disabled (`setup_networks`, `use_lora=True`)",
    "separate": "the naive layout, three UNets: generator and assistant, each with its own LoRA, on two separate "
    "copies (`setup_networks` with a separate generator UNet, the DMD2-init path) and a third, frozen copy as the "
    "reference (also checkpointed)",
    "full": "full finetuning as DMD2: float32 copies of generator and assistant with AdamW, bf16 reference (also "
    "checkpointed) (`setup_networks`, `use_lora=False`)",
}

#: ``--quick``: the reduced modules at 64², one (cold) timed call, SDXL base at 2 steps, no compilation, training at
#: batch 1 and 2: a smoke run of every code path in seconds, whose numbers mean nothing.
QUICK = {
    "size": "reduced",
    "resolution": 64,
    "warmup": 0,
    "repeats": 1,
    "sdxl_steps": 2,
    "compile_mode": None,
    "training_batch_sizes": (1, 2),
}


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run. Build it with :meth:`resolve`, which fills in the device-dependent defaults.

    Args:
        device: where the modules run.
        size: the model size (:data:`~diffusers_di_star.benchmarking.components.SIZES`).
        resolution: image size in pixels (square).
        warmup, repeats: untimed and timed calls per measurement; the median of the timed calls is reported.
        inference_batch_sizes, training_batch_sizes: images per call / per training iteration.
        dtype: weights of the peer, our default pipeline and SDXL base (fp16 on CUDA, as released; fp32 on a CPU).
        fast_dtype: weights of the fast settings (bf16; fp16 means an fp16-fix-style VAE without upcast).
        compile_mode: ``torch.compile`` mode of the fast settings, or ``None``.
        sdxl_steps, sdxl_guidance_scale: the multi-step baseline (SDXL base, 50 steps, CFG 5).
        layouts: training layouts to compare (:data:`TRAINING_LAYOUTS`).
        assistant_updates: K_TA, assistant updates per DI* iteration.
        reward: include the PickScore reward (VAE decode + CLIP ViT-H backward) as the paper's recipe does.
        find_largest_batch: search the largest training batch that fits (CUDA only).
        seed: weights and noise.
        quick: a smoke run (:data:`QUICK`), recorded in the report.
    """

    device: torch.device
    size: ModelSize
    resolution: int
    warmup: int
    repeats: int
    dtype: torch.dtype
    fast_dtype: torch.dtype
    compile_mode: str | None
    find_largest_batch: bool
    inference_batch_sizes: tuple[int, ...] = (1, 4)
    training_batch_sizes: tuple[int, ...] = (1, 2, 4)
    sdxl_steps: int = 50
    sdxl_guidance_scale: float = 5.0
    layouts: tuple[str, ...] = ("three-in-one", "separate")
    assistant_updates: int = 1
    reward: bool = True
    seed: int = 0
    quick: bool = False

    @classmethod
    def resolve(cls, device: str | None = None, quick: bool = False, **options) -> BenchSettings:
        """Settings from options; an option that is ``None`` or missing takes its default for the device."""
        device = torch.device(device or default_device())
        cuda = device.type == "cuda"
        defaults = {
            "size": "full" if cuda else "reduced",
            "warmup": 2 if cuda else 1,
            "repeats": 5,
            "dtype": DTYPES[default_dtype(device.type)],
            "fast_dtype": torch.bfloat16,
            "compile_mode": "max-autotune" if cuda else None,
            "find_largest_batch": cuda,
        }
        if quick:
            defaults |= QUICK | {"find_largest_batch": False}
        explicit = {name: value for name, value in options.items() if value is not None}
        values = defaults | explicit
        if values["size"] not in SIZES:
            raise ValueError(f"size must be one of {tuple(SIZES)}, got {values['size']!r}.")
        values["size"] = SIZES[values["size"]]
        if values["compile_mode"] == "none":
            values["compile_mode"] = None
        values.setdefault("resolution", values["size"].resolution)
        settings = cls(device=device, quick=quick, **values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad value."""
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} requested, but this torch build sees no CUDA device.")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8 (the VAE factor), got {self.resolution}.")
        for name in ("inference_batch_sizes", "training_batch_sizes"):
            sizes = getattr(self, name)
            if not sizes or min(sizes) < 1:
                raise ValueError(f"{name} must be positive integers, got {sizes}.")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"need warmup >= 0 and repeats >= 1, got {self.warmup} and {self.repeats}.")
        if self.sdxl_steps < 1 or self.assistant_updates < 1:
            raise ValueError(
                f"sdxl_steps and assistant_updates must be >= 1, got {self.sdxl_steps} and {self.assistant_updates}."
            )
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES} or None, got {self.compile_mode!r}.")
        if self.find_largest_batch and self.device.type != "cuda":
            raise ValueError("the largest-batch search needs a CUDA device: a CPU has no memory limit to find.")
        unknown = sorted(set(self.layouts) - set(TRAINING_LAYOUTS))
        if unknown or not self.layouts:
            raise ValueError(f"layouts must be among {tuple(TRAINING_LAYOUTS)}, got {self.layouts}.")
