"""The ``di-star`` command line: ``di-star generate | demo | export | eval | bench | serve``.

Each sub-command is a ``_add_<name>_parser`` function that registers its arguments and its ``_cmd_<name>`` handler.
Errors a user can fix (:class:`~diffusers_di_star.errors.DIStarError`: :class:`CLIError`, ``ModelLoadError``,
``ExportError``, ...) are printed as one line, no traceback, exit 2.
Numbers and ``--out`` are checked (:func:`_check_args`) before any handler runs, hence before any model loads, and
before torch, diffusers and transformers are imported (the handlers import them): a mistyped flag fails in about a
second. Only ``--device`` needs torch to be checked, last.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys

from .defaults import DTYPE_NAMES, MAX_BATCH_SIZE, MAX_IMAGE_PIXELS
from .errors import DIStarError, first_line, is_disk_full
from .sources import folder_write_problem, reward_option_problem

DEFAULT_MODEL = "XDG-XHS/distar_long_1step"
_DTYPE_CHOICES = sorted(DTYPE_NAMES)


class CLIError(DIStarError):
    """An error with a message that tells the user what to do; printed without a traceback."""


def _add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="one-step text-to-image with the model family's DI* pipeline")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"Hub id or local pipeline folder, e.g. SDXL (default {DEFAULT_MODEL})"
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat the flag for several")
    p.add_argument("--prompt-file", default=None, help="a UTF-8 text file with one prompt a line (after --prompt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="default: the model's native size (1024 for SDXL)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call (default 4)")
    p.add_argument(
        "--out", default="outputs", help="output folder (created if missing); existing images are never replaced"
    )
    p.add_argument("--dtype", choices=_DTYPE_CHOICES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=_cmd_generate)


def _read_prompt_file(path: str) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"cannot read --prompt-file {path!r} as UTF-8 text ({err}); pass one prompt a line.") from err
    if not prompts:
        raise CLIError(f"--prompt-file {path!r} holds no prompt; write one prompt a line.")
    return prompts


def _save_new_png(image, path: str) -> str:
    """Save ``image`` at ``path``, or at ``stem-1.png``, ``stem-2.png``, ... if taken: nothing is overwritten.

    The exclusive create (``"xb"``) makes this safe against another run writing into the same folder at once.
    """
    stem, ext = os.path.splitext(path)
    for n in itertools.count():
        candidate = path if n == 0 else f"{stem}-{n}{ext}"
        try:
            with open(candidate, "xb") as f:
                try:
                    image.save(f, format="PNG")
                except BaseException:
                    f.close()
                    os.remove(candidate)  # no half-written image under a name the next run would skip
                    raise
            return candidate
        except FileExistsError:
            continue
        except OSError as err:
            if is_disk_full(err):
                raise CLIError(
                    f"disk full at {os.path.dirname(path) or '.'}: {candidate} was not written (the images listed "
                    "before it are complete); free some space, or pass another --out."
                ) from None
            raise


def _cmd_generate(args) -> None:
    import torch
    from tqdm.auto import tqdm

    from .runtime import default_device, default_dtype, load_pipeline

    prompts = args.prompt + (_read_prompt_file(args.prompt_file) if args.prompt_file else [])
    if not prompts:
        raise CLIError("give at least one --prompt or a --prompt-file.")
    device = args.device or default_device()
    dtype = args.dtype or default_dtype(device)
    pipe = load_pipeline(args.model, dtype=dtype, device=device, variant=args.variant)
    pipe.set_progress_bar_config(disable=True)
    os.makedirs(args.out, exist_ok=True)
    # One generator through all batches: the noise (hence each image) does not depend on --batch-size.
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    starts = range(0, len(prompts), args.batch_size)
    for start in tqdm(starts, desc="di-star generate", unit="batch", disable=len(starts) == 1, file=sys.stderr):
        try:
            images = pipe(
                prompt=prompts[start : start + args.batch_size],
                height=args.height,
                width=args.width,
                num_images_per_prompt=args.num_images,
                generator=generator,
            ).images
        except ValueError as err:  # check_inputs: the message names the value and the fix
            raise CLIError(str(err)) from err
        for i, image in enumerate(images):
            prompt_index, image_index = divmod(i, args.num_images)
            name = f"{args.seed:06d}_{start + prompt_index:03d}_{image_index:02d}.png"
            print(_save_new_png(image, os.path.join(args.out, name)), flush=True)


def _add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="offline end-to-end demo on a tiny SDXL built locally")
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> None:
    from . import demo

    demo.run(args.out)


_EXPORT_FORMATS = ("comfyui-checkpoint", "comfyui-unet", "kohya-lora", "comfyui-lora", "diffusers")
_EXPORT_OPTIONS = (
    "dtype",
    "base_model",
    "variant",
    "subfolder",
    "weight_name",
    "lora_alpha",
    "conditioning_timestep",
    "unet_keys",
)


def _add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="convert a model for ComfyUI / A1111 / kohya tools, or back to Diffusers",
        description="comfyui-checkpoint: full SDXL or SD1.x/2.x single file (Load Checkpoint); comfyui-unet: UNet "
        "only (Load Diffusion Model); kohya-lora: a Diffusers LoRA in kohya format with its true alpha (LoraLoader); "
        "comfyui-lora: an SD3 / FLUX.1 LoRA with its true alphas (LoraLoader at strength 1.0); "
        "diffusers: a single file, UNet file, DMD2 .bin or kohya LoRA back to a Diffusers folder. See docs/export.md.",
    )
    p.add_argument("--model", required=True, help="local folder or file, or Hub id ('owner/name')")
    p.add_argument("--format", required=True, choices=_EXPORT_FORMATS)
    p.add_argument("--out", required=True, help="output .safetensors file (a folder for --format diffusers)")
    p.add_argument("--dtype", choices=_DTYPE_CHOICES, default=None, help="default: fp16 (diffusers: keep as stored)")
    p.add_argument(
        "--base-model",
        default=None,
        help="Diffusers SDXL or SD folder or Hub id giving the architecture (and, for --format diffusers, the "
        "tokenizers and scheduler); default: a LoRA run's base model, else SDXL base 1.0",
    )
    p.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16")
    p.add_argument("--subfolder", default=None, help="subfolder of --model that holds the UNet")
    p.add_argument("--weight-name", default=None, help="file inside --model (e.g. dmd2_sdxl_1step_unet_fp16.bin)")
    p.add_argument("--lora-alpha", type=float, default=None, help="the LoRA's lora_alpha, if its file lacks metadata")
    p.add_argument("--conditioning-timestep", type=int, default=None, help="t* written to the metadata (default 399)")
    p.add_argument(
        "--unet-keys",
        choices=("comfyui", "single-file"),
        default=None,
        help="comfyui-unet key layout: comfyui (bare keys, every ComfyUI version; default) or single-file "
        "(model.diffusion_model. prefix, for Diffusers' from_single_file)",
    )
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
        "per-image scores (CSV, JSON), a Markdown table in the paper's layout and a contact sheet to --out. An "
        "interrupted run resumes where it stopped. See docs/evaluation.md.",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="Hub id or local Diffusers folder of any family (SDXL, SD1.5/2.x, SD3, FLUX.1); repeatable",
    )
    p.add_argument(
        "--prompts",
        required=True,
        help="parti | coco | hpsv2 | a .txt (one prompt a line), .csv (a prompt column) or .json file | a folder with "
        "the HPSv2 benchmark's anime/concept-art/paintings/photo .json files",
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
    p.add_argument("--dtype", choices=_DTYPE_CHOICES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
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
    from .runtime import default_device, default_dtype

    device = args.device or default_device()
    dtype = args.dtype or default_dtype(device)
    reward_options = _parse_reward_options(args.reward_option)
    if problem := reward_option_problem(reward_options, "--reward-option"):
        raise CLIError(problem)
    metrics = None if args.metrics is None else [name.strip() for name in args.metrics.split(",") if name.strip()]
    if metrics == []:
        raise CLIError("--metrics is empty: name at least one reward, e.g. --metrics pickscore (or drop the flag).")
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


_BENCH_SUITES = ("all", "flops", "inference", "training", "memory")
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
        "vs three separate UNets. Full-size modules on CUDA; a reduced size on CPU, for ratios only. memory (not part "
        "of all): the peak memory of one DI* iteration at full size, computed on fake tensors without allocating it, "
        "for every combination of the listed layouts, batches, precisions, optimizers and checkpointing, per GPU "
        "under FSDP2 (--gpus). Prints a Markdown report. See docs/benchmarks.md.",
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
    p.add_argument("--dtype", choices=_DTYPE_CHOICES, default=None, help="peer/default weights (fp16 CUDA, fp32 CPU)")
    p.add_argument("--fast-dtype", choices=_DTYPE_CHOICES, default=None, help="weights of the fast settings (bf16)")
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
    memory = p.add_argument_group("memory (computed without allocating it; full size by default)")
    memory.add_argument("--precision", type=_comma_list(str), default=("bf16",), help="frozen weights: bf16,fp32")
    memory.add_argument("--optimizer", type=_comma_list(str), default=("adamw",), help="adamw,adamw8bit")
    memory.add_argument("--gradient-checkpointing", type=_comma_list(str), default=("on",), help="on,off (default on)")
    memory.add_argument("--gpus", type=_comma_list(int), default=(1,), help="FSDP2 over N GPUs, e.g. 1,2,4,8")
    p.add_argument("--out", default=None, help="also write report.md and one JSON of raw records per suite here")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench_memory(args) -> None:
    from .benchmarking.components import SIZES
    from .benchmarking.memory import MemorySetting, run_memory_benchmark
    from .benchmarking.report import write
    from .benchmarking.runner import _quiet

    checkpointing = {"on": True, "off": False}
    unknown = sorted(set(args.gradient_checkpointing) - set(checkpointing))
    if unknown:
        raise CLIError(f"--gradient-checkpointing takes on,off, got {','.join(unknown)}.")
    size = SIZES[args.size or "full"]
    grid = itertools.product(
        args.layouts or ("three-in-one",),
        args.training_batch_sizes or (1,),
        args.precision,
        args.optimizer,
        args.gradient_checkpointing,
    )
    try:
        resolution, reward = args.resolution or size.resolution, args.reward is not False
        settings = [
            MemorySetting(layout, batch, resolution, dtype, optimizer, checkpointing[ckpt], reward, size)
            for layout, batch, dtype, optimizer, ckpt in grid
        ]
    except ValueError as err:
        raise CLIError(str(err)) from err
    print(f"di-star bench memory: {len(settings)} setting(s), SDXL {size.name} on fake tensors ...", file=sys.stderr)
    with _quiet():
        result = run_memory_benchmark(settings, tuple(args.gpus))
    report = "\n\n".join([f"### {result.title}", *result.tables, "\n".join(f"- {n}" for n in result.notes)]) + "\n"
    print(report, end="")
    for path in write([result], report, args.out) if args.out is not None else []:
        print(f"wrote {path}")


def _cmd_bench(args) -> None:
    from .benchmarking import SUITES, BenchSettings, run_benchmarks
    from .weights import DTYPES

    if args.suite == "memory":
        _cmd_bench_memory(args)
        return
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
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    print(
        f"di-star bench: {', '.join(suites)} on {settings.device} ({settings.size.name} modules, "
        f"{settings.resolution}²{', --quick' if args.quick else ''})",
        file=sys.stderr,
        flush=True,
    )
    report, paths = run_benchmarks(
        suites, settings, args.out, on_suite=lambda name: print(f"di-star bench: running {name} ...", file=sys.stderr)
    )
    print(report, end="")
    for path in paths:
        print(f"wrote {path}")


def _add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="the demo app in your browser: live one-step generation as you type, before/after of two models",
        description="A Gradio page (pip install 'diffusers-di-star[demo]'): images follow your typing; seed, size, "
        "batch grid, model and LoRA pickers, PNG download with the settings in its metadata, and the same seed "
        "through two models side by side. --tiny builds a tiny offline model to try the page without a download.",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hub id or local Diffusers folder of any family (SDXL, SD1.5/2.x, SD3, FLUX.1; default {DEFAULT_MODEL})",
    )
    p.add_argument("--compare-model", default=None, help="the 'after' model of the before/after tab (default --model)")
    p.add_argument("--tiny", action="store_true", help="serve a tiny random-weight SDXL built locally (offline)")
    p.add_argument("--size", type=int, default=None, help="initial width and height (default 1024; 64 with --tiny)")
    p.add_argument("--dtype", choices=_DTYPE_CHOICES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to share on your network)")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> None:
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}.")
    try:
        from .demo_ui import build_app
    except ImportError as err:
        raise CLIError(f"di-star serve needs gradio ({err}): pip install 'diffusers-di-star[demo]'.") from err
    model, size = args.model, args.size
    if args.tiny:
        import tempfile

        from .testing import save_tiny_sdxl_pipeline

        model = save_tiny_sdxl_pipeline(os.path.join(tempfile.mkdtemp(prefix="di-star-tiny-"), "tiny-sdxl"))
        size = size or 64
    app = build_app(
        model, args.compare_model, size=size or 1024, device=args.device, dtype=args.dtype, variant=args.variant
    )
    app.launch(server_name=args.host, server_port=args.port)


#: Smallest (and largest) value of each numeric option, by its argparse ``dest``, for every sub-command that has it.
#: Floats must also be finite. A ``--seed`` is a 32-bit unsigned integer; eval derives SEED*1000000+i from it.
_NUMBER_RANGES = {
    "seed": (0, 2**32 - 1),
    "height": (1, None),
    "width": (1, None),
    "num_images": (1, MAX_BATCH_SIZE),
    "batch_size": (1, MAX_BATCH_SIZE),
    "num_prompts": (1, None),
    "steps": (1, None),
    "guidance_scale": (0.0, None),
    "lora_alpha": (0.0, None),
    "resolution": (8, None),
    "warmup": (0, None),
    "repeats": (1, None),
    "sdxl_steps": (1, None),
    "assistant_updates": (1, None),
    "batch_sizes": (1, None),
    "training_batch_sizes": (1, None),
    "gpus": (1, None),
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_number(dest: str, value) -> None:
    low, high = _NUMBER_RANGES[dest]
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, float) and not math.isfinite(item):
            raise CLIError(f"{_flag(dest)} must be a finite number, got {item}.")
        if dest == "lora_alpha" and item <= 0:
            raise CLIError(f"{_flag(dest)} must be > 0 (the LoRA scale is lora_alpha / r), got {item}.")
        if item < low or (high is not None and item > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise CLIError(f"{_flag(dest)} must be {bound}, got {item}.")


def _check_out(path: str, is_folder: bool) -> None:
    """``--out`` must be creatable: a folder (or a file's parent folder) that can be written."""
    if is_folder and os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"--out {path!r} is a file; pass a folder (it is created if missing).")
    problem = folder_write_problem(path if is_folder else os.path.dirname(os.path.abspath(path)))
    if problem:
        raise CLIError(f"--out {path!r} cannot be created: {problem}.")


def _check_args(args) -> None:
    """Range and finiteness of every number, the pixel limit of an explicit size, and ``--out``, before any loading."""
    for dest in _NUMBER_RANGES:
        if getattr(args, dest, None) is not None:
            _check_number(dest, getattr(args, dest))
    height, width = getattr(args, "height", None), getattr(args, "width", None)
    if height is not None and width is not None:
        if height * width > MAX_IMAGE_PIXELS:
            raise CLIError(
                f"--height {height} --width {width} is {height * width:,} pixels, above the limit of "
                f"{MAX_IMAGE_PIXELS:,} (4096×4096) per image; pass a smaller size (docs/pipeline.md)."
            )
    if args.command == "generate" and args.num_images * min(args.batch_size, _prompt_count(args)) > MAX_BATCH_SIZE:
        raise CLIError(
            f"--num-images {args.num_images} × --batch-size {args.batch_size} is more than {MAX_BATCH_SIZE} images "
            "in one pipeline call: lower --batch-size (the images are the same whatever the batch)."
        )
    if getattr(args, "out", None) is not None:
        _check_out(args.out, is_folder=args.command != "export")
    if getattr(args, "device", None) is not None:  # last: the only check that imports torch
        _check_device(args.device)


def _prompt_count(args) -> int:
    return len(args.prompt) + (1 if args.prompt_file else 0) or 1  # a prompt file counts as at least one


def _check_device(device: str) -> None:
    """``--device`` names a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"--device {device!r} is not a device ({first_line(err)}); pass e.g. cpu or cuda.") from None
    backend = getattr(torch, parsed.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if parsed.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise CLIError(f"--device {device!r}: no {parsed.type} device is available here; pass --device cpu.")
    if parsed.index is not None and parsed.type != "cpu" and parsed.index >= backend.device_count():
        raise CLIError(f"--device {device!r}: this machine has {backend.device_count()} {parsed.type} device(s).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="di-star", description="Diff-Instruct* one-step SDXL tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_generate_parser, _add_demo_parser, _add_export_parser, _add_eval_parser, _add_bench_parser,
                _add_serve_parser):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        args.func(args)
    except DIStarError as err:  # every error a user can fix (CLIError, ModelLoadError, ExportError, ...)
        print(f"di-star {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = ": finished images are kept, rerun the same command to resume" if args.command == "eval" else ""
        print(f"\ndi-star {args.command}: interrupted{resume}.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
