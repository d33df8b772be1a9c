"""What a resume may change: one table (:data:`RESUME_POLICY`), and the checks that read it (docs/training.md).

Each checkpoint's manifest records the trainer's settings (:func:`resume_settings`). On resume every flag of the table
is compared with the saved value:

* ``match``: refused when it differs (it decides the networks' shapes, the map g_θ(z, t*), or a state the checkpoint
  restores over the flag: the optimizer's learning rate and betas, the EMA's decay, the LR schedule's type);
* ``note``: may change, with a logged note (an objective weight or a data setting; the model card states the new one);
* ``model``: the same model, compared by real path, else by a hash of its config files (the same model reached by a
  symlink or another mount passes with a note); a different one is refused unless ``--allow_model_change``;
* ``bound``: ``--max_train_steps`` may change but not fall below the checkpoint's step.

The manifest itself is checked against the files by :func:`.checkpointing.check_manifest_contents` (its step against
the folder's name, the tensor shapes it recorded against the safetensors headers).
"""

from __future__ import annotations

import hashlib
import logging
import os

from ..errors import DIStarError

__all__ = [
    "RESUME_POLICY",
    "ResumeError",
    "check_step_bound",
    "compare_settings",
    "resume_settings",
    "source_fingerprint",
]

logger = logging.getLogger(__name__)

_LORA = tuple(f"{r}_lora_{key}" for r in ("generator", "assistant") for key in ("rank", "alpha", "target_modules"))

#: The one table: flag -> what a resume may do with it.
RESUME_POLICY: dict[str, str] = {
    **dict.fromkeys(("pretrained_model_name_or_path", "pretrained_generator", "pretrained_vae_model_name_or_path"),
                    "model"),
    **dict.fromkeys(
        ("pretrained_generator_weight_name", "revision", "use_lora", *_LORA, "conditioning_timestep", "divergence",
         "cfg_mode", "use_ema", "ema_decay", "use_8bit_adam", "learning_rate", "assistant_learning_rate", "scale_lr",
         "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "lr_scheduler"),
        "match",
    ),
    **dict.fromkeys(
        ("reward", "reward_scale", "guidance_scale", "cfg_reward_scale", "huber_c", "weighting", "min_timestep",
         "max_timestep", "assistant_updates_per_step", "resolution", "train_batch_size",
         "gradient_accumulation_steps", "max_grad_norm", "lr_warmup_steps", "seed", "mixed_precision", "variant"),
        "note",
    ),
    "max_train_steps": "bound",
}  # fmt: skip
#: Where the model identities (config hashes) are kept in the saved settings.
FINGERPRINTS = "source_fingerprints"


class ResumeError(DIStarError, ValueError):
    """A resume that would not continue the saved run; the message names the flag, both values and the fix."""


def source_fingerprint(source: str | None) -> str | None:
    """A hash of a local model's identity: its config files (a folder), or its size and first MiB (a file)."""
    if source is None or not os.path.exists(source):
        return None
    digest = hashlib.sha256()
    if os.path.isfile(source):
        digest.update(str(os.path.getsize(source)).encode())
        with open(source, "rb") as f:
            digest.update(f.read(1 << 20))
        return digest.hexdigest()[:16]
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.endswith(".json") and os.path.getsize(path) < (1 << 20):
                digest.update(os.path.relpath(path, source).replace(os.sep, "/").encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:16]


def resume_settings(args) -> dict:
    """The flags of :data:`RESUME_POLICY` (LoRA ones only with ``--use_lora``) as a checkpoint records them.

    Local model paths are stored resolved (real path), with their :func:`source_fingerprint`.
    """
    settings = {flag: getattr(args, flag) for flag in RESUME_POLICY if args.use_lora or flag not in _LORA}
    fingerprints = {}
    for flag, kind in RESUME_POLICY.items():
        if kind == "model" and settings[flag] is not None and os.path.exists(settings[flag]):
            settings[flag] = os.path.realpath(settings[flag])
            fingerprints[flag] = source_fingerprint(settings[flag])
    for flag in _LORA:
        if flag.endswith("_target_modules") and flag in settings:
            settings[flag] = [name.strip() for name in settings[flag].split(",") if name.strip()]
    return {**settings, FINGERPRINTS: fingerprints}


def _same_path(saved, given) -> bool:
    if saved is None or given is None:
        return saved == given
    return saved == given or os.path.realpath(saved) == os.path.realpath(given)


def compare_settings(
    saved: dict, given: dict, checkpoint: str, step: int, allow_model_change: bool = False
) -> list[str]:
    """Check ``given`` settings against those ``saved`` at ``step`` by :data:`RESUME_POLICY`; returns notes to log.

    Flags a checkpoint did not record (an older trainer) are not compared.
    """
    name = os.path.basename(os.path.normpath(checkpoint))
    notes = []
    for flag, kind in RESUME_POLICY.items():
        if flag not in saved or flag not in given or saved[flag] == given[flag]:
            continue
        old, new = saved[flag], given[flag]
        if kind == "note":
            notes.append(f"--{flag} changes from {old!r} to {new!r} at step {step} (the model card states {new!r})")
        elif kind == "bound":
            if new is None:  # --num_train_epochs: checked by check_step_bound once the steps are known
                continue
            if new < step:
                raise ResumeError(
                    f"--max_train_steps {new}: {name} is already at step {step}; pass a larger --max_train_steps to "
                    "train on, or use the checkpoint as it is."
                )
            notes.append(f"--{flag} changes from {old!r} to {new!r}")
        elif kind == "model" and _same_path(old, new):
            continue
        elif kind == "model":
            old_hash = saved.get(FINGERPRINTS, {}).get(flag)
            same = old_hash is not None and old_hash == given.get(FINGERPRINTS, {}).get(flag)
            if same or allow_model_change:
                why = "the same config files" if same else "--allow_model_change"
                notes.append(f"--{flag} {new!r} is taken for {old!r} of {name} ({why}; weights are not compared)")
                continue
            raise ResumeError(
                f"--{flag}: {name} was trained with {old!r}, this run gives {new!r} (their configs differ); resume "
                "with the same model, or pass --allow_model_change if it is the same model (e.g. downloaded again)."
            )
        else:
            raise ResumeError(
                f"--{flag}: {name} was trained with {old!r}, this run gives {new!r}; resume with the same value (or "
                "start a new run in another --output_dir)."
            )
    return notes


def check_step_bound(step: int, max_train_steps: int, checkpoint: str) -> None:
    """``--max_train_steps`` (also when derived from ``--num_train_epochs``) must not be below the resumed step."""
    compare_settings({"max_train_steps": None}, {"max_train_steps": max_train_steps}, checkpoint, step)
