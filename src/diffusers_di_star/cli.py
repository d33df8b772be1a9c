"""The ``di-star`` command line: ``di-star generate | demo | export | eval | bench``.

Each sub-command is a ``_add_<name>_parser`` function that registers its arguments and its ``_cmd_<name>`` handler.
Errors a user can fix (:class:`CLIError`, ``runtime.ModelLoadError``) are printed as one line, no traceback, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from .runtime import DTYPES, ModelLoadError, default_device, default_dtype, load_pipeline

DEFAULT_MODEL = "XDG-XHS/distar_long_1step"


class CLIError(Exception):
    """An error with a message that tells the user what to do; printed without a traceback."""


def _add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="one-step text-to-image with DIStarSDXLPipeline")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"Hub id or local SDXL-layout folder (default {DEFAULT_MODEL})"
    )
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat the flag for several")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="default: the model's native size (1024 for SDXL)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--out", default="outputs", help="output folder (created if missing)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> None:
    import torch

    device = args.device or default_device()
    dtype = args.dtype or default_dtype(device)
    if args.num_images < 1:
        raise CLIError(f"--num-images must be >= 1, got {args.num_images}.")
    pipe = load_pipeline(args.model, dtype=dtype, device=device, variant=args.variant)
    pipe.set_progress_bar_config(disable=True)
    os.makedirs(args.out, exist_ok=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    try:
        images = pipe(
            prompt=args.prompt,
            height=args.height,
            width=args.width,
            num_images_per_prompt=args.num_images,
            generator=generator,
        ).images
    except ValueError as err:  # check_inputs: the message names the value and the fix
        raise CLIError(str(err)) from err
    paths = []
    for i, image in enumerate(images):
        prompt_index, image_index = divmod(i, args.num_images)
        path = os.path.join(args.out, f"{args.seed:06d}_{prompt_index:03d}_{image_index:02d}.png")
        image.save(path)
        paths.append(path)
    print("\n".join(paths))


def _add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="offline end-to-end demo on a tiny SDXL built locally")
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> None:
    from . import demo

    demo.run(args.out)


_EXPORT_FORMATS = ("comfyui-checkpoint", "comfyui-unet", "kohya-lora", "diffusers")
_EXPORT_OPTIONS = ("dtype", "base_model", "variant", "subfolder", "weight_name", "lora_alpha", "conditioning_timestep")


def _add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="convert a model for ComfyUI / A1111 / kohya tools, or back to Diffusers",
        description="comfyui-checkpoint: full SDXL single file (Load Checkpoint); comfyui-unet: UNet only (Load "
        "Diffusion Model); kohya-lora: a Diffusers LoRA in kohya format with its true alpha (LoraLoader); "
        "diffusers: a single file, UNet file, DMD2 .bin or kohya LoRA back to a Diffusers folder. See docs/export.md.",
    )
    p.add_argument("--model", required=True, help="local folder or file, or Hub id ('owner/name')")
    p.add_argument("--format", required=True, choices=_EXPORT_FORMATS)
    p.add_argument("--out", required=True, help="output .safetensors file (a folder for --format diffusers)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 (diffusers: keep as stored)")
    p.add_argument(
        "--base-model",
        default=None,
        help="Diffusers SDXL folder or Hub id giving the architecture (and, for --format diffusers, the tokenizers "
        "and scheduler); default: SDXL base 1.0",
    )
    p.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16")
    p.add_argument("--subfolder", default=None, help="subfolder of --model that holds the UNet")
    p.add_argument("--weight-name", default=None, help="file inside --model (e.g. dmd2_sdxl_1step_unet_fp16.bin)")
    p.add_argument("--lora-alpha", type=float, default=None, help="the LoRA's lora_alpha, if its file lacks metadata")
    p.add_argument("--conditioning-timestep", type=int, default=None, help="t* written to the metadata (default 399)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> None:
    from .export import ExportError, export_model
    from .weights import CheckpointError

    options = {name: getattr(args, name) for name in _EXPORT_OPTIONS}
    try:
        path = export_model(args.model, args.format, args.out, overwrite=args.overwrite, **options)
    except (ExportError, CheckpointError) as err:
        raise CLIError(str(err)) from err
    print(path)


def _add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score models on the paper's prompt sets (Table 1: Parti/COCO; Table 3: HPSv2)",
        description="Generate one image per prompt with each --model, score them with the reward models and write "
        "per-image scores (CSV, JSON), a Markdown table in the paper's layout and an image grid to --out. An "
        "interrupted run resumes where it stopped. See docs/evaluation.md.",
    )
    p.add_argument("--model", action="append", required=True, help="Hub id or local SDXL-layout folder; repeatable")
    p.add_argument(
        "--prompts",
        required=True,
        help="parti | coco | hpsv2 | a .txt (one prompt a line) or .json file | a folder with the HPSv2 benchmark's "
        "anime/concept-art/paintings/photo .json files",
    )
    p.add_argument(
        "--metrics",
        default=None,
        help="comma-separated reward names: imagereward,aesthetic,pickscore,clip,hpsv2.1 (default: the first four; "
        "hpsv2.1 for a prompt set with styles)",
    )
    p.add_argument("--num-prompts", type=int, default=None, help="the first N prompts (of each style); default all")
    p.add_argument("--batch-size", type=int, default=4, help="images generated and scored at once")
    p.add_argument("--seed", type=int, default=0, help="image i is generated with seed SEED*1000000+i")
    p.add_argument("--out", required=True, help="output folder; rerun with the same one to resume or add models")
    p.add_argument("--steps", type=int, default=1, help="1: one-step DI* pipeline; >1: SDXL's Euler sampler with CFG")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale with --steps > 1 (default 5.0)")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size (1024 for SDXL)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--reward-option",
        action="append",
        default=[],
        metavar="NAME.OPTION=VALUE",
        help="a reward loader option, e.g. pickscore.model=/ckpt/PickScore_v1 (docs/rewards.md); repeatable",
    )
    p.set_defaults(func=_cmd_eval)


def _parse_reward_options(items: list[str]) -> dict[str, dict[str, str]]:
    """``["pickscore.model=/p", "hpsv2.1.checkpoint=/q"]`` -> ``{"pickscore": {"model": "/p"}, "hpsv2.1": {...}}``."""
    options: dict[str, dict[str, str]] = {}
    for item in items:
        key, equals, value = item.partition("=")
        name, dot, option = key.rpartition(".")
        if not (equals and dot and name and option and value):
            raise CLIError(
                f"--reward-option {item!r} must look like NAME.OPTION=VALUE, e.g. pickscore.model=/ckpt/PickScore_v1."
            )
        options.setdefault(name, {})[option] = value
    return options


def _cmd_eval(args) -> None:
    from . import evaluation

    device = args.device or default_device()
    dtype = args.dtype or default_dtype(device)
    reward_options = _parse_reward_options(args.reward_option)
    metrics = [name.strip() for name in args.metrics.split(",")] if args.metrics else None
    try:
        prompt_set = evaluation.load_prompt_set(args.prompts)
        sampling = {"steps": args.steps, "guidance_scale": args.guidance_scale, "variant": args.variant}
        models = [evaluation.ModelSpec(model, dtype=dtype, **sampling) for model in args.model]
        result = evaluation.evaluate(
            models,
            prompt_set,
            args.out,
            metrics=metrics,
            num_prompts=args.num_prompts,
            seed=args.seed,
            batch_size=args.batch_size,
            height=args.height,
            width=args.width,
            device=device,
            reward_options=reward_options,
        )
    except (ValueError, ImportError) as err:  # bad settings, prompt sets, reward specs, missing packages
        raise CLIError(str(err)) from err
    print(result.table, end="")
    print("\n".join(f"{kind}: {path}" for kind, path in result.files.items()))


_BENCH_SUITES = ("all", "flops", "inference", "training")
_BENCH_OPTIONS = ("size", "resolution", "warmup", "repeats", "compile_mode", "sdxl_steps", "layouts")
_BENCH_OPTIONS += ("assistant_updates", "reward", "seed")


def _comma_list(cast):
    def parse(text: str) -> tuple:
        try:
            return tuple(cast(item) for item in text.split(","))
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from err

    return parse


def _add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="speed and memory benchmarks on random-weight SDXL modules (nothing to download)",
        description="flops: FLOP counts of the SDXL modules (meta device). inference: the peer recipe (SDXL + "
        "LCMScheduler, timesteps=[399]), our pipeline with default and fast settings, the floor (modules called "
        "directly) and SDXL base at 50 steps with CFG, side by side. training: one DI* iteration, three-in-one LoRA "
        "vs three separate UNets. Full-size modules on CUDA; a reduced size on CPU, for ratios only. Prints a "
        "Markdown report. See docs/benchmarks.md.",
    )
    p.add_argument("suite", nargs="?", default="all", choices=_BENCH_SUITES, help="default: all")
    p.add_argument("--quick", action="store_true", help="smoke run: reduced modules at 64², one call each")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--size", choices=("full", "reduced"), default=None, help="default: full on CUDA, reduced on CPU")
    p.add_argument("--resolution", type=int, default=None, help="default: 1024 (full), 256 (reduced), 64 (--quick)")
    p.add_argument("--batch-sizes", type=_comma_list(int), default=None, help="inference batches (default 1,4)")
    p.add_argument("--training-batch-sizes", type=_comma_list(int), default=None, help="default 1,2,4")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per measurement (default 2 CUDA, 1 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls, median reported (default 5)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="peer/default weights (fp16 CUDA, fp32 CPU)")
    p.add_argument("--fast-dtype", choices=sorted(DTYPES), default=None, help="weights of the fast settings (bf16)")
    p.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of the fast settings, or none (default: max-autotune on CUDA, none on CPU)",
    )
    p.add_argument("--sdxl-steps", type=int, default=None, help="steps of the SDXL base baseline (default 50)")
    p.add_argument(
        "--layouts", type=_comma_list(str), default=None, help="training layouts: three-in-one,separate (default),full"
    )
    p.add_argument("--assistant-updates", type=int, default=None, help="K_TA per training iteration (default 1)")
    p.add_argument("--no-reward", dest="reward", action="store_false", default=None, help="train without PickScore")
    p.add_argument(
        "--largest-batch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="search the largest training batch that fits (default: on CUDA)",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=None, help="also write report.md and one JSON of raw records per suite here")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> None:
    from .benchmarking import SUITES, BenchSettings, run_benchmarks

    options = {name: getattr(args, name) for name in _BENCH_OPTIONS}
    options |= {
        "inference_batch_sizes": args.batch_sizes,
        "training_batch_sizes": args.training_batch_sizes,
        "find_largest_batch": args.largest_batch,
        "dtype": args.dtype and DTYPES[args.dtype],
        "fast_dtype": args.fast_dtype and DTYPES[args.fast_dtype],
    }
    try:
        settings = BenchSettings.resolve(device=args.device, quick=args.quick, **options)
    except ValueError as err:
        raise CLIError(str(err)) from err
    report, paths = run_benchmarks(list(SUITES) if args.suite == "all" else [args.suite], settings, args.out)
    print(report, end="")
    for path in paths:
        print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="di-star", description="Diff-Instruct* one-step SDXL tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_generate_parser, _add_demo_parser, _add_export_parser, _add_eval_parser, _add_bench_parser):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, ModelLoadError) as err:
        print(f"di-star {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
