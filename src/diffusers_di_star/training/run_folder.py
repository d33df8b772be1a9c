"""A run folder (``--output_dir``) has one owner at a time, and ``--overwrite_output_dir`` leaves only the new run.

* :func:`acquire_run_lock` writes :data:`LOCK_NAME` (pid, host, start time) with an atomic create: a second trainer
  on the same folder is refused with one line naming the owner. A lock left by a process that is gone (same host,
  pid not running) is taken over with a note; one from another host cannot be checked and is refused with the way to
  clear it. Under ``accelerate launch`` only the main process takes the lock (the others get its outcome by
  broadcast, :func:`~diffusers_di_star.training.checkpointing.on_main_process`).
* :func:`check_process_group` refuses processes that ``accelerate launch`` started as one job but that came up as
  separate single-process runs (``DistributedType.NO`` with ``WORLD_SIZE`` > 1), which would all write one folder.
* :func:`clear_previous_run` removes what a previous run of this trainer wrote, and only that (:func:`run_outputs`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass

from ..errors import DIStarError

__all__ = [
    "LOCK_NAME",
    "RunFolderError",
    "RunLock",
    "acquire_run_lock",
    "check_process_group",
    "clear_previous_run",
    "run_outputs",
]

logger = logging.getLogger(__name__)

LOCK_NAME = "di_star_run.lock"
#: Files and folders this trainer writes at the top of ``--output_dir`` (besides checkpoints, the pipeline's
#: component folders listed in its model_index.json, and the logging folder).
RUN_ENTRIES = ("training_args.json", "pytorch_lora_weights.safetensors", "model_index.json", "images", "validation")
#: The model card is removed only when it is this trainer's (the tag :func:`~diffusers_di_star.hub.write_model_card`
#: writes); a README.md the user wrote stays.
MODEL_CARD_MARK = "di-star"


class RunFolderError(DIStarError, ValueError):
    """The run folder is owned by another run, or the launch would let several runs write it."""


@dataclass
class RunLock:
    """The lock this process holds on a run folder; :meth:`release` removes it if it is still ours."""

    path: str
    token: str

    def release(self) -> None:
        if _read(self.path).get("token") == self.token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def acquire_run_lock(output_dir: str) -> RunLock:
    """Own ``output_dir`` (created if missing) until :meth:`RunLock.release` or the process exits."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    token = uuid.uuid4().hex
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = f"{path}.{token}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({**owner, "token": token}, f)
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic: fails if the lock exists (also on NFS)
                break
            except FileExistsError:
                held = _read(path)
                pid, host = held.get("pid"), held.get("host")
                same_process = host == owner["host"] and pid == owner["pid"]  # a run that ended by an exception
                if not (same_process or (host == owner["host"] and isinstance(pid, int) and not _alive(pid))):
                    raise RunFolderError(_held_message(output_dir, held)) from None
                if not same_process:
                    logger.warning(
                        f"{path}: the run that held {output_dir} (pid {pid} on {host}) is gone; taking it over"
                    )
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
        else:
            raise RunFolderError(_held_message(output_dir, _read(path)))
    finally:
        os.remove(tmp)
    lock = RunLock(path, token)
    atexit.register(lock.release)
    return lock


def _held_message(output_dir: str, held: dict) -> str:
    who = f"pid {held.get('pid', '?')} on {held.get('host', '?')}, since {held.get('started', '?')}"
    return (
        f"--output_dir {output_dir!r} is in use by another trainer ({who}): wait for it to finish or stop it, or "
        f"pass another --output_dir; if that run is dead on another machine, delete "
        f"{os.path.join(output_dir, LOCK_NAME)}."
    )


def check_process_group(num_processes: int) -> None:
    """Refuse processes launched as one job (``WORLD_SIZE`` > 1) that did not form one process group."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > num_processes:
        raise RunFolderError(
            f"accelerate started {world} processes, but each runs alone (no process group: e.g. a multi-GPU config "
            "on a machine without GPUs), so they would all train into one --output_dir. Launch one process "
            "(`accelerate launch --num_processes 1 ...`), or on CPUs set ACCELERATE_USE_CPU=1 with --multi_gpu."
        )


def run_outputs(output_dir: str, logging_dir: str | None = None) -> list[str]:
    """The entries of ``output_dir`` that this trainer wrote (names relative to it), sorted.

    Checkpoints (complete, half-written, set aside); and, in a folder that holds the trainer's
    ``training_args.json`` (written last by a finished run), :data:`RUN_ENTRIES`, the component folders of a saved
    pipeline (from its model_index.json), a model card carrying :data:`MODEL_CARD_MARK`, and ``logging_dir`` when
    inside. A Diffusers folder that no run of this trainer finished (e.g. a downloaded model) loses nothing else.
    """
    from .checkpointing import checkpoint_dirs, incomplete_dirs

    if not os.path.isdir(output_dir):
        return []
    names = set(checkpoint_dirs(output_dir)) | set(incomplete_dirs(output_dir))
    names |= {n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n.endswith(".old")}
    if not os.path.isfile(os.path.join(output_dir, "training_args.json")):
        return sorted(names)
    names |= {n for n in RUN_ENTRIES if os.path.lexists(os.path.join(output_dir, n))}
    index = _read(os.path.join(output_dir, "model_index.json"))
    names |= {n for n, v in index.items() if isinstance(v, list) and os.path.isdir(os.path.join(output_dir, n))}
    card = os.path.join(output_dir, "README.md")
    if os.path.isfile(card) and names:
        with open(card, encoding="utf-8", errors="replace") as f:
            if MODEL_CARD_MARK in f.read(4096):
                names.add("README.md")
    if logging_dir and not os.path.isabs(logging_dir):
        top = os.path.normpath(logging_dir).split(os.sep)[0]
        if top not in ("", ".", "..") and os.path.isdir(os.path.join(output_dir, top)):
            names.add(top)
    return sorted(names)


def clear_previous_run(output_dir: str, logging_dir: str | None = None) -> list[str]:
    """``--overwrite_output_dir``: remove :func:`run_outputs` and say what; everything else in the folder stays."""
    removed = run_outputs(output_dir, logging_dir)
    for name in removed:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if removed:
        kept = sorted(set(os.listdir(output_dir)) - {LOCK_NAME})
        logger.warning(
            f"--overwrite_output_dir: removed the previous run's {', '.join(removed)} from {output_dir}"
            + (f"; kept {', '.join(kept)} (not written by this trainer)" if kept else "")
        )
    return removed
