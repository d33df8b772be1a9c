"""Evaluation: prompt sets -> images -> reward scores -> the paper's tables (Table 1 and Table 3 layouts).

Example::

    from diffusers_di_star.evaluation import ModelSpec, evaluate, load_prompt_set

    result = evaluate(
        [ModelSpec("XDG-XHS/distar_long_1step", dtype="fp16", variant="fp16"),
         ModelSpec("stabilityai/stable-diffusion-xl-base-1.0", steps=50, dtype="fp16", variant="fp16")],
        load_prompt_set("parti"), "runs/parti", metrics=["imagereward", "aesthetic", "pickscore", "clip"],
    )
    print(result.table)

The command line is ``di-star eval``; see ``docs/evaluation.md`` for the paper's numbers and the exact commands.
"""

from .prompts import HPS_STYLES, PROMPT_SETS, Prompt, PromptSet, PromptSetError, load_prompt_set
from .report import METRICS, TABLE_1_METRICS, TABLE_3_METRICS, Metric, format_table, get_metric, summarize
from .runner import (
    DEFAULT_GUIDANCE_SCALE,
    EvaluationError,
    EvaluationResult,
    ModelSpec,
    evaluate,
    generate_images,
    image_seed,
    load_model,
)

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "HPS_STYLES",
    "METRICS",
    "PROMPT_SETS",
    "TABLE_1_METRICS",
    "TABLE_3_METRICS",
    "EvaluationError",
    "EvaluationResult",
    "Metric",
    "ModelSpec",
    "Prompt",
    "PromptSet",
    "PromptSetError",
    "evaluate",
    "format_table",
    "generate_images",
    "get_metric",
    "image_seed",
    "load_model",
    "load_prompt_set",
    "summarize",
]
