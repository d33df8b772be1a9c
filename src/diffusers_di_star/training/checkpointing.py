"""Training checkpoints (``<output_dir>/checkpoint-<step>``): complete or absent, resumable only as they were trained.

* A checkpoint is written into ``checkpoint-<step>.tmp`` and renamed when complete (``os.replace``, atomic on one
  filesystem): a ``checkpoint-<step>`` folder is always complete. Older checkpoints beyond the total limit are removed
  only after the rename, so a save killed at any point leaves the previous checkpoint intact. A ``.tmp`` folder left
  by such a kill is named in a warning by :func:`resolve_resume`, never silently skipped. The rename waits until the
  main process sees every file that every rank wrote: ranks writing into different folders (non-shared storage
  across nodes) stop the run at the first save with one :class:`CheckpointError`. A write that fails on any rank
  (its disk is full, its shard write raises) is agreed on by all ranks after each stage of the save: every rank raises
  the same :class:`CheckpointWriteError` naming the first failing rank, none is left waiting in a collective, and the
  ``.tmp`` folder is removed (the previous checkpoint stays ``latest``).
* Each checkpoint holds :data:`MANIFEST_NAME`: its step, the trainer's settings (what a resume may change is decided
  by :data:`~.resume.RESUME_POLICY`: a refusal is one line naming the flag, the saved and the given value), every file
  with its size and the tensor shapes of its safetensors files (a hand-edited manifest is refused).
* Resuming never unpickles code: the generator EMA is stored as safetensors (:data:`EMA_NAME`, its scalars as JSON
  metadata), accelerate reads its own files (optimizer, scheduler, RNG states) with ``torch.load(weights_only=True)``
  (accelerate >= 1.0 ``utils.other.load``), and a file the manifest does not list (e.g. accelerate's
  ``custom_checkpoint_0.pkl``, which it would load with ``weights_only=False``) makes the checkpoint refused. An RNG
  state file that would run code is refused by name before accelerate, which would skip it silently, reads it.

What goes into a checkpoint is the caller's: :func:`save_checkpoint` takes a ``write_state(folder)`` callable (e.g.
``accelerator.save_state``) and :func:`load_checkpoint` a ``load_state(folder)`` one. Decisions that touch the folder
are taken by the main process and broadcast (:func:`on_main_process`), so all ranks agree on ``latest``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import struct
import time
import warnings
from collections.abc import Callable, Mapping

from ..errors import DIStarError, first_line, is_disk_full
from ..sources import folder_write_problem
from .resume import compare_settings

__all__ = [
    "EMA_NAME",
    "MANIFEST_NAME",
    "RUN_FILES",
    "CheckpointError",
    "CheckpointWriteError",
    "check_run_folder",
    "checkpoint_dirs",
    "incomplete_dirs",
    "load_checkpoint",
    "on_main_process",
    "resolve_resume",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "di_star_checkpoint.json"
EMA_NAME = "ema.safetensors"
#: Files a finished run leaves in ``--output_dir`` besides its checkpoints (LoRA or full pipeline, settings).
RUN_FILES = ("training_args.json", "pytorch_lora_weights.safetensors", "model_index.json")

_COMPLETE = re.compile(r"^checkpoint-(\d+)$")
_INCOMPLETE = re.compile(r"^checkpoint-(\d+)\.tmp$")


class CheckpointError(DIStarError, ValueError):
    """A checkpoint or run folder that cannot be used as asked; the message names it and the fix."""


def tensor_shapes(folder: str) -> dict[str, dict[str, list[int]]]:
    """``{file: {tensor: shape}}`` of every ``.safetensors`` file under ``folder``, read from the headers only."""
    shapes = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".safetensors"):
                path = os.path.join(root, name)
                shapes[os.path.relpath(path, folder).replace(os.sep, "/")] = _header_shapes(path)
    return dict(sorted(shapes.items()))


def _header_shapes(path: str) -> dict[str, list[int]]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(min(length, 100 << 20)))
    return {key: value["shape"] for key, value in sorted(header.items()) if key != "__metadata__"}


def check_manifest_contents(checkpoint: str, manifest: dict) -> None:
    """The manifest agrees with the files: its step with the folder's name, its shapes with the safetensors headers."""
    path = os.path.join(checkpoint, MANIFEST_NAME)
    step = manifest["step"]
    folder = _COMPLETE.match(os.path.basename(os.path.normpath(checkpoint)))
    if not isinstance(step, int) or step < 0 or (folder and int(folder.group(1)) != step):
        raise CheckpointError(f"{path} is damaged (step {step!r} in a folder named {os.path.basename(checkpoint)})")
    recorded = manifest.get("shapes")
    if recorded is None:  # written by an older trainer
        return
    try:
        actual = tensor_shapes(checkpoint)
    except (OSError, ValueError, KeyError, struct.error) as error:
        raise CheckpointError(f"{checkpoint}: a safetensors header cannot be read ({error})") from None
    for name in sorted(set(recorded) | set(actual)):
        if recorded.get(name) != actual.get(name):
            raise CheckpointError(f"{path} is damaged (the tensor shapes of {name} differ from the file's)")


def _by_step(output_dir: str, pattern: re.Pattern) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := pattern.match(name))]
    return [name for _, name in sorted(found)]


def checkpoint_dirs(output_dir: str) -> list[str]:
    """The complete ``checkpoint-<step>`` folders in ``output_dir``, oldest first."""
    return _by_step(output_dir, _COMPLETE)


def incomplete_dirs(output_dir: str) -> list[str]:
    """The half-written ``checkpoint-<step>.tmp`` folders (a save that was interrupted), oldest first."""
    return _by_step(output_dir, _INCOMPLETE)


def on_main_process(accelerator, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` on the main process; every process returns its result or raises its exception."""
    from accelerate.utils import broadcast_object_list

    outcome = [None, None]
    if accelerator.is_main_process:
        try:
            outcome[0] = fn(*args, **kwargs)
        except Exception as error:  # re-raised below on every process, so no rank waits forever
            outcome[1] = error
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def check_run_folder(output_dir: str, resuming: bool, overwrite: bool) -> None:
    """Refuse an ``output_dir`` that is empty, a file, unwritable, or holds another run (unless resuming or
    overwriting it)."""
    if not output_dir.strip():
        raise CheckpointError("--output_dir is empty: pass a folder (it is created if missing).")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CheckpointError(f"--output_dir {output_dir!r} is a file: pass a folder (it is created if missing).")
    problem = folder_write_problem(output_dir)
    if problem:
        raise CheckpointError(f"--output_dir {output_dir!r} cannot be created: {problem}; choose another folder.")
    if resuming or overwrite or not os.path.isdir(output_dir):
        return
    found = [*checkpoint_dirs(output_dir), *incomplete_dirs(output_dir)]
    found += [name for name in RUN_FILES if os.path.exists(os.path.join(output_dir, name))]
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise CheckpointError(
            f"--output_dir {output_dir!r} already holds a run ({shown}): pass --resume_from_checkpoint latest to "
            "continue it, --overwrite_output_dir to replace it, or another --output_dir."
        )


def _json_value(value):
    return json.loads(json.dumps(value))  # tuples -> lists, so saved and given settings compare equal


def _file_sizes(folder: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    sizes.pop(MANIFEST_NAME, None)
    return dict(sorted(sizes.items()))


def save_ema(state: dict, folder: str) -> None:
    """An EMA's ``state_dict()``: shadow parameters as safetensors, scalars (decay, step, …) as JSON metadata."""
    from safetensors.torch import save_file

    state = dict(state)
    tensors = {f"shadow_params.{i}": p.detach().contiguous().cpu() for i, p in enumerate(state.pop("shadow_params"))}
    save_file(tensors, os.path.join(folder, EMA_NAME), metadata={"state": json.dumps(state)})


def load_ema(ema, folder: str) -> None:
    """Inverse of :func:`save_ema`; the shadow parameters keep their device and dtype, count and shapes must match."""
    from safetensors import safe_open

    path = os.path.join(folder, EMA_NAME)
    with safe_open(path, framework="pt") as f:
        state = json.loads(f.metadata()["state"])
        shadow = [f.get_tensor(f"shadow_params.{i}") for i in range(len(list(f.keys())))]
    if [p.shape for p in shadow] != [p.shape for p in ema.shadow_params]:
        raise CheckpointError(f"{path}: the EMA does not match the generator's parameters (other settings?).")
    ema.load_state_dict(
        {**state, "shadow_params": [s.to(p.device, p.dtype) for s, p in zip(shadow, ema.shadow_params, strict=True)]}
    )


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    write_state: Callable[[str], None],
    settings: Mapping[str, object],
    total_limit: int | None = None,
    ema=None,
) -> str:
    """Write ``checkpoint-<step>``: ``write_state(tmp)`` on every process, the EMA and the manifest, then the rename.

    ``ema`` is a :class:`~diffusers_di_star.training.ema.ShardedEMA`. Only then are the oldest complete checkpoints
    beyond ``total_limit`` and stale ``.tmp`` folders of earlier steps removed. Returns the checkpoint path. A write
    that fails on any process (e.g. its disk is full) raises one :class:`CheckpointWriteError` on every process, naming
    that rank, after the ranks agree (:func:`_on_every_rank`): none waits in a collective, the ``.tmp`` folder is
    removed and the previous checkpoint stays the newest complete one.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"

    def make_folder():
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)

    _on_every_rank(accelerator, final, make_folder)
    _on_every_rank(accelerator, final, write_state, tmp)
    # Every rank: a sharded EMA (training/ema.py) is gathered here; only the main process keeps it.
    ema_state = None if ema is None else ema.state_dict(keep=accelerator.is_main_process)
    _check_every_rank_visible(accelerator, tmp)

    def complete():
        if not accelerator.is_main_process:
            return
        if ema_state is not None:
            save_ema(ema_state, tmp)
        manifest = {"step": step, "settings": _json_value(dict(settings)), "files": _file_sizes(tmp)}
        manifest["shapes"] = tensor_shapes(tmp)
        with open(os.path.join(tmp, MANIFEST_NAME), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(final):  # the same step saved again: set the old one aside until the new one is in place
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        shutil.rmtree(final + ".old", ignore_errors=True)
        logger.info(f"saved {final}")

    _on_every_rank(accelerator, final, complete)
    on_main_process(accelerator, _remove_old_checkpoints, output_dir, step, total_limit)
    return final


def _remove_old_checkpoints(output_dir: str, step: int, total_limit: int | None) -> None:
    """The oldest complete checkpoints beyond ``total_limit``, and ``.tmp`` folders of steps before ``step``."""
    complete = checkpoint_dirs(output_dir)
    if total_limit is not None:
        for name in complete[: max(len(complete) - total_limit, 0)]:
            logger.info(f"removing {name} (checkpoints_total_limit={total_limit})")
            shutil.rmtree(os.path.join(output_dir, name))
    for name in incomplete_dirs(output_dir):
        if int(name.split("-")[1].split(".")[0]) < step:
            logger.info(f"removing {name}: an interrupted save, superseded by checkpoint-{step}")
            shutil.rmtree(os.path.join(output_dir, name))


class CheckpointWriteError(CheckpointError):
    """A checkpoint not written because a write failed on one rank (or more); every rank raises it.

    ``rank`` is the first failing rank (``None`` in a single-process run), ``cause`` its error as ``Type: first
    line`` (an ``OSError`` names its file), ``disk_full`` whether that was a full disk (:func:`is_disk_full`).
    """

    def __init__(self, checkpoint: str, rank: int | None, cause: str, disk_full: bool):
        self.checkpoint, self.rank, self.cause, self.disk_full = checkpoint, rank, cause, disk_full
        super().__init__(
            f"{os.path.basename(checkpoint)} was not written{self.on_rank} ({cause}); the newest complete checkpoint "
            "is unchanged: fix the cause and resume from it (--resume_from_checkpoint latest)"
        )

    @property
    def on_rank(self) -> str:
        """`` on rank N``, or nothing in a single-process run."""
        return "" if self.rank is None else f" on rank {self.rank}"


def _on_every_rank(accelerator, checkpoint: str, fn: Callable, *args) -> None:
    """``fn(*args)`` on every process, then one gather of each rank's outcome: if it raised anywhere, every rank
    raises the same :class:`CheckpointWriteError` (the first failing rank's); the main process removes the ``.tmp``.

    The gather is also the barrier after ``fn``: no rank goes on to the next collective (or to training) while another
    failed, so none hangs there, and a rank's failed write is never followed by a checkpoint marked complete.
    """
    failure, outcome = None, None
    try:
        fn(*args)
    except (Exception, _checkpoint_exception()) as error:  # every rank learns of it below; torch's is a BaseException
        failure = error
        rank, error = _first_failure(error, accelerator.process_index)
        outcome = (rank, _cause(error), is_disk_full(error))
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        outcomes = [found for found in gather_object([outcome]) if found is not None]
    else:
        outcomes = [] if outcome is None else [(None, *outcome[1:])]
    if not outcomes:
        return
    if accelerator.is_main_process:
        shutil.rmtree(checkpoint + ".tmp", ignore_errors=True)  # frees what was written; never taken as `latest`
    raise CheckpointWriteError(checkpoint, *min(outcomes)) from failure


def _check_every_rank_visible(accelerator, folder: str) -> None:
    """Every file any rank wrote into ``folder`` is visible to the main process, which marks the checkpoint complete.

    Otherwise the ranks wrote into different folders (an ``--output_dir`` on each node's own disk): one
    :class:`CheckpointError` on every rank, at the first save, instead of a checkpoint that misses shards. A network
    filesystem may show another node's new files late, so the main process looks again for up to
    :data:`VISIBILITY_TIMEOUT` seconds.
    """
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    listings = gather_object([sorted(_file_sizes(folder)) if os.path.isdir(folder) else []])
    on_main_process(accelerator, _wait_until_visible, folder, listings)


#: Seconds the main process waits for the other ranks' checkpoint files to appear (see _check_every_rank_visible).
VISIBILITY_TIMEOUT = 30.0


def _wait_until_visible(folder: str, listings: list[list[str]]) -> None:
    deadline, pause = time.monotonic() + VISIBILITY_TIMEOUT, 0.1
    while True:
        missing = [(rank, name) for rank, names in enumerate(listings) for name in names]
        missing = [(rank, name) for rank, name in missing if not os.path.exists(os.path.join(folder, name))]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(pause)
        pause = min(2 * pause, 2.0)
    if missing:
        rank, name = missing[0]
        raise CheckpointError(
            f"rank {rank} wrote {name} of {os.path.basename(folder)} where the main process does not see it "
            f"({len(missing)} file(s) missing from {folder}): --output_dir must be one folder that every node shares "
            "(e.g. a network filesystem); the checkpoint was not marked complete"
        )


def _read_manifest(checkpoint: str) -> dict:
    path = os.path.join(checkpoint, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{checkpoint!r} has no {MANIFEST_NAME}: it was not written by this trainer (or by an older version), "
            "so its settings cannot be checked; start a new run"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        missing = {"step", "settings", "files"} - set(manifest)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path} is damaged ({error})") from None
    if missing:
        raise CheckpointError(f"{path} is damaged (no {', '.join(sorted(missing))})")
    return manifest


def _verify_files(checkpoint: str, manifest: dict) -> None:
    """Every listed file is there with its size, and no file is unlisted (nothing foreign gets loaded)."""
    actual = _file_sizes(checkpoint)
    for name, size in manifest["files"].items():
        if name not in actual:
            raise CheckpointError(f"{os.path.join(checkpoint, name)} is missing")
        if actual[name] != size:
            raise CheckpointError(f"{os.path.join(checkpoint, name)} is damaged ({actual[name]} bytes, saved {size})")
    if foreign := sorted(set(actual) - set(manifest["files"])):
        raise CheckpointError(
            f"{os.path.join(checkpoint, foreign[0])} was not written by this trainer: refusing to load the checkpoint "
            "(a file added to a shared checkpoint could run code); remove it"
        )


def _intact_manifest(checkpoint: str) -> dict:
    """The manifest of ``checkpoint`` after checking its files; a problem is named with the previous intact one."""
    try:
        manifest = _read_manifest(checkpoint)
        _verify_files(checkpoint, manifest)
        check_manifest_contents(checkpoint, manifest)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; {_previous_hint(checkpoint)}") from None
    return manifest


def _previous_hint(checkpoint: str) -> str:
    """Where to resume from instead of the damaged ``checkpoint``: the newest earlier one whose files all check out."""
    output_dir, name = os.path.split(os.path.normpath(checkpoint))
    step = (m := _COMPLETE.match(name) or _INCOMPLETE.match(name)) and int(m.group(1))
    for candidate in reversed(checkpoint_dirs(output_dir)):
        if step is not None and int(candidate.split("-")[1]) >= step:
            continue
        path = os.path.join(output_dir, candidate)
        try:
            _verify_files(path, _read_manifest(path))
        except CheckpointError:
            continue
        return f"the previous intact checkpoint is {candidate} (--resume_from_checkpoint {path})"
    return "there is no earlier intact checkpoint: start a new run"


def check_settings(checkpoint: str, settings: Mapping[str, object], allow_model_change: bool = False) -> dict:
    """The checkpoint's manifest, after checking ``settings`` against the saved ones (:mod:`.resume`'s table)."""
    manifest = _intact_manifest(checkpoint)
    notes = compare_settings(
        manifest["settings"], _json_value(dict(settings)), checkpoint, manifest["step"], allow_model_change
    )
    for note in notes:
        logger.warning(f"resuming {checkpoint}: {note}")
    return manifest


def resolve_resume(
    accelerator, output_dir: str, resume_from_checkpoint: str | None, settings, allow_model_change: bool = False
) -> str | None:
    """The checkpoint to resume from (``"latest"``: the newest complete one), its settings checked; all ranks agree.

    Half-written ``.tmp`` folders are named in a warning. ``latest`` with no checkpoint at all starts a new run;
    with only a half-written one it is an error.
    """
    if resume_from_checkpoint is None:
        return None
    return on_main_process(accelerator, _resolve, output_dir, resume_from_checkpoint, settings, allow_model_change)


def _resolve(output_dir: str, resume_from_checkpoint: str, settings, allow_model_change: bool) -> str | None:
    if resume_from_checkpoint == "latest":
        complete, incomplete = checkpoint_dirs(output_dir), incomplete_dirs(output_dir)
        if not complete and incomplete:
            raise CheckpointError(
                f"{output_dir!r} holds only the half-written {', '.join(incomplete)} (a save was interrupted): "
                "nothing to resume; pass --overwrite_output_dir to start over."
            )
        if not complete:
            logger.info(f"no checkpoint in {output_dir}: starting a new run")
            return None
        checkpoint = os.path.join(output_dir, complete[-1])
        for name in incomplete:
            logger.warning(
                f"{os.path.join(output_dir, name)} is half-written (a save was interrupted) and is ignored; "
                f"resuming from {complete[-1]}"
            )
    else:
        checkpoint = resume_from_checkpoint
        if _INCOMPLETE.match(os.path.basename(os.path.normpath(checkpoint))):
            raise CheckpointError(
                f"--resume_from_checkpoint {checkpoint!r} is half-written (a save was interrupted); "
                f"{_previous_hint(checkpoint)}."
            )
        if not os.path.isdir(checkpoint):
            raise CheckpointError(f"--resume_from_checkpoint {checkpoint!r} is not a folder (or pass 'latest').")
    check_settings(checkpoint, settings, allow_model_change)
    return checkpoint


def _probe(checkpoint: str, names=None) -> str | None:
    """The first file of ``checkpoint`` (of ``names``) that safetensors or accelerate's weights-only ``load`` cannot
    read, and why."""
    from accelerate.utils import load
    from safetensors import safe_open

    for name in _file_sizes(checkpoint) if names is None else names:
        path = os.path.join(checkpoint, name)
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            elif name.endswith((".bin", ".pkl", ".pt", ".pth")):
                load(path, map_location="cpu", weights_only=True)  # accelerate's RNG-state numpy types allowed
            elif name.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    json.load(f)
        except pickle.UnpicklingError as error:  # torch's weights-only unpickler met a global it does not allow
            detail = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), "")
            return f"{path} holds Python objects, not just weights ({detail or 'refused'}): it could run code"
        except Exception as error:  # what a reader raises for a damaged file varies
            return f"{path} cannot be read ({type(error).__name__}: {first_line(error)})"
    return None


def _checkpoint_exception() -> type[BaseException]:
    """torch's distributed-checkpoint ``CheckpointException`` (a ``BaseException``), imported on use: the trainer
    checks its ``--output_dir`` with this module before torch is imported."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _first_failure(error: BaseException, rank: int | None) -> tuple[int | None, BaseException]:
    """(rank, error) of ``error`` raised on ``rank``; for a distributed-checkpoint error, the first failing rank and
    its own exception."""
    if isinstance(error, _checkpoint_exception()) and error.failures:
        rank, (error, _) = min(error.failures.items())
    return rank, error


def _cause(error: BaseException) -> str:
    """``Type: first line`` of ``error``; for a distributed-checkpoint error, of the first rank's own exception."""
    rank, error = _first_failure(error, None)
    on_rank = "" if rank is None else f" on rank {rank}"
    return f"{type(error).__name__}{on_rank}: {first_line(error)}"


def load_checkpoint(accelerator, checkpoint: str, load_state: Callable[[str], None], ema=None) -> int:
    """``load_state(checkpoint)`` and the EMA after checking the files; returns the checkpoint's step.

    A missing, truncated, unlisted or unreadable (e.g. code-carrying pickle) file, or any error of ``load_state``
    (torch's distributed-checkpoint ``CheckpointException`` included, a ``BaseException``), raises
    :class:`CheckpointError` naming the file or the error and the previous intact checkpoint.
    """
    manifest = on_main_process(accelerator, _loadable_manifest, checkpoint)
    with _quiet_refusals():
        try:
            load_state(checkpoint)
            if ema is not None:
                load_ema(ema, checkpoint)
        except CheckpointError:
            raise
        except (Exception, _checkpoint_exception()) as error:  # torch's distributed-checkpoint error: a BaseException
            reason = _probe(checkpoint) or f"{checkpoint} cannot be loaded ({_cause(error)})"
            raise CheckpointError(f"{reason}; {_previous_hint(checkpoint)}") from error
    return int(manifest["step"])


@contextlib.contextmanager
def _quiet_refusals():
    """Without torch's "Detected pickle protocol 4" warning, printed before a weights-only load refuses a pickle."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        yield


def _loadable_manifest(checkpoint: str) -> dict:
    """:func:`_intact_manifest`, and the RNG state files readable without code: accelerate would skip an unreadable
    one with an INFO line ("Could not load random states") and resume with fresh random states."""
    manifest = _intact_manifest(checkpoint)
    rng_files = [name for name in manifest["files"] if re.fullmatch(r"random_states_\d+\.pkl", name)]
    with _quiet_refusals():
        if reason := _probe(checkpoint, rng_files):
            raise CheckpointError(f"{reason}; {_previous_hint(checkpoint)}")
    return manifest
