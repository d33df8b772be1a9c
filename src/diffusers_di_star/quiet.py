"""Drop library log messages a user cannot act on; each filter matches one exact message, all others stay.

Installed when this module is imported, which ``diffusers_di_star/__init__.py`` does first and eagerly (its other names
load on first use), so any ``diffusers_di_star`` import installs them before transformers' image-processor classes
are imported.
Checked with diffusers 0.42.1 and transformers 5.24.0; ``tests/test_cli.py`` runs the demo and asserts both are gone.
"""

from __future__ import annotations

import logging

__all__ = ["install"]

#: logger name -> message fragments that identify the messages dropped from it.
SILENCED = {
    # diffusers' ModelMixin.to() warns on every dtype cast when `_keep_in_fp32_modules` is an EMPTY list (it tests
    # `is not None`), so "should be kept in float32: []" names nothing to keep. The pipeline's fp16-VAE upcast and the
    # trainer's casts would print it on every call. A non-empty list is a real warning and is kept.
    "diffusers.models.modeling_utils": ("should be kept in float32: [].",),
    # transformers >= 5 notes, per image-processor class, that without torchvision it falls back to the PIL processor.
    # SDXL text-to-image never runs an image processor (only IP-Adapter would), and our reward models preprocess
    # with their own code, so there is nothing to act on.
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


#: SDXL's encode_prompt logs the whole truncated tail of a long prompt, once per text encoder (800 KB for a
#: 100,000-word prompt): shortened to its start and length, and a notice identical to the previous one is dropped.
TRUNCATION_LOGGER = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"
TRUNCATION_NOTICE = "The following part of your input was truncated because CLIP can only handle sequences up to"
TRUNCATION_SHOWN = 80


class _ShortenTruncation(logging.Filter):
    def __init__(self):
        super().__init__()
        self.last = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(TRUNCATION_NOTICE):
            return True
        head, _, removed = message.partition(" tokens: ")
        if len(removed) > TRUNCATION_SHOWN:
            removed = f"{removed[:TRUNCATION_SHOWN]}… ({len(removed):,} characters in all)"
        record.msg, record.args = f"{head} tokens: {removed}", ()
        repeated, self.last = record.msg == self.last, record.msg
        return not repeated


def install() -> None:
    """Add the filters of :data:`SILENCED` and the truncation notice's to their loggers (idempotent)."""
    for name, fragments in SILENCED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
    logger = logging.getLogger(TRUNCATION_LOGGER)
    if not any(isinstance(f, _ShortenTruncation) for f in logger.filters):
        logger.addFilter(_ShortenTruncation())


install()
