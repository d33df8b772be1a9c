"""One base class for the errors a user causes and can fix, and one way to show any error as a single line.

Every such error in the package derives from :class:`DIStarError`; the ``di-star`` commands and the trainer catch it
and print its message as one line (no traceback; ``--debug`` or ``DI_STAR_DEBUG=1`` shows it).
"""

from __future__ import annotations

import errno

__all__ = ["DIStarError", "ModelLoadError", "first_line", "is_disk_full"]


class DIStarError(Exception):
    """An error whose message names the problem and the fix; printed as one line, without a traceback."""


class ModelLoadError(DIStarError):
    """A model that cannot be found or read; the message says what to download or which path to pass."""


def first_line(error: BaseException, limit: int | None = 200) -> str:
    """The first non-empty line of ``error``'s message (at most ``limit`` characters), else its class name."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(error).__name__


def is_disk_full(error: BaseException) -> bool:
    """A write that failed for lack of space: ``ENOSPC``/``EDQUOT``, or safetensors' size check after a short write
    ("unexpected pos …", its error when the disk fills during ``save_file``)."""
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in str(error)
