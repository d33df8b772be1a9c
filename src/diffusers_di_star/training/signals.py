"""SIGTERM (what Slurm and Kubernetes send before preemption) stops a run at the next step boundary, all ranks at once.

The handler only sets a flag: the step in progress finishes. At each step boundary :meth:`StopRequest.agreed` sums
the flag over the ranks (one all-reduce of one number), so a signal that reached any rank, or all of them, makes
every rank save the same checkpoint and exit together; no rank is left waiting in a collective.
"""

from __future__ import annotations

import signal

__all__ = ["EXIT_TERMINATED", "StopRequest"]

#: The trainer's exit status after a SIGTERM stop (128 + 15, the shell's convention for "terminated").
EXIT_TERMINATED = 143


class StopRequest:
    """A SIGTERM handler that records the signal; :meth:`restore` puts the previous handler back."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        self.requested = False
        self._previous = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(self.signum, self._previous)

    def agreed(self, accelerator) -> bool:
        """True on every rank when any rank got the signal (called by all ranks at the same step boundary)."""
        if accelerator.num_processes == 1:
            return self.requested
        import torch

        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
