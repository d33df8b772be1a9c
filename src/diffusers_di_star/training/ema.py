"""The generator's EMA (docs/training.md, "LoRA and EMA under FSDP2"), kept where each rank's parameters live.

Under FSDP2 a parameter is a DTensor sharded over the ranks; :class:`ShardedEMA` runs diffusers' ``EMAModel`` on each
rank's local shard (the update ē ← ē − (1 − β)(ē − θ) is elementwise, so a step needs no communication — NVIDIA
FastGen keeps its FSDP2 EMA the same way). The full EMA exists only when :meth:`ShardedEMA.state_dict` gathers it, to
save a checkpoint; the export copies the shards into the generator's own shards (:meth:`ShardedEMA.copy_to`), which the
trainer then gathers like the weights. Under DDP or on one process a parameter is its own local shard, so the same
class is plain ``EMAModel``. Checkpoints hold full tensors, whatever the number of processes that wrote them.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import EMAModel
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["ShardedEMA"]


def _local(parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    # Each rank's shard of a DTensor, as a view of its storage that keeps `requires_grad` (EMAModel averages the
    # parameters that require a gradient and copies the others).
    with torch.enable_grad():
        return [p.to_local() if isinstance(p, DTensor) else p for p in parameters]


class ShardedEMA:
    """An exponential moving average of ``parameters`` (plain tensors or FSDP2 DTensors), shard by shard.

    The decay schedule is ``EMAModel``'s: β = min(k / (9 + k), ``decay``) at optimisation step k ≥ 2, 0 at k = 1.
    Every rank must call :meth:`state_dict` (it gathers the shards); :meth:`load_state_dict` takes full tensors and
    keeps this rank's shard of each, so a checkpoint resumes on any number of processes.
    """

    def __init__(self, parameters, decay: float):
        self.parameters = list(parameters)
        self.ema = EMAModel(_local(self.parameters), decay=decay, foreach=True)

    @property
    def shadow_params(self) -> list[torch.Tensor]:
        """The EMA with the parameters' global shapes (DTensors under FSDP2; no communication)."""
        return [
            DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            if isinstance(p, DTensor)
            else s
            for s, p in zip(self.ema.shadow_params, self.parameters, strict=True)
        ]

    def step(self) -> None:
        """One EMA update from the parameters' current values (after the optimiser step)."""
        self.ema.step(_local(self.parameters))

    def copy_to(self) -> None:
        """Overwrite the parameters with their EMA (each rank its own shards)."""
        self.ema.copy_to(_local(self.parameters))

    def state_dict(self, keep: bool = True) -> dict | None:
        """``EMAModel.state_dict`` with full CPU tensors; all ranks call it, those with ``keep=False`` get ``None``.

        One tensor is gathered at a time (a full copy on the device only while it moves to the CPU).
        """
        shadow = []
        for s in self.shadow_params:
            full = s.full_tensor() if isinstance(s, DTensor) else s
            if keep:
                shadow.append(full.detach().cpu())
        if not keep:
            return None
        return {**self.ema.state_dict(), "shadow_params": shadow}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`: full tensors in, each rank keeps its shard (no communication)."""
        shards = [
            distribute_tensor(s.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None).to_local()
            if isinstance(p, DTensor)
            else s.to(p.device, p.dtype)
            for s, p in zip(state["shadow_params"], self.parameters, strict=True)
        ]
        self.ema.load_state_dict({**state, "shadow_params": shards})
