"""The ``di-star`` command line: ``di-star generate | demo`` (more sub-commands are added by their modules' issues).

Each sub-command is a ``_add_<name>_parser`` function that registers its arguments and its ``_cmd_<name>`` handler.
Errors a user can fix are raised as :class:`CLIError` and printed as one line (no traceback), exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_MODEL = "XDG-XHS/distar_long_1step"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class CLIError(Exception):
    """An error with a message that tells the user what to do; printed without a traceback."""


def _torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(model: str, dtype: str = "fp32", device: str | None = None, variant: str | None = None):
    """``DIStarSDXLPipeline.from_pretrained`` with a one-line, actionable error when the model cannot be found."""
    from .pipeline_di_star_sdxl import DIStarSDXLPipeline

    is_local = os.path.isdir(model)
    if not is_local and (model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1)):
        raise CLIError(f"--model {model!r} is neither a local folder nor a Hub id (expected 'owner/name' or a path).")
    try:
        pipe = DIStarSDXLPipeline.from_pretrained(model, dtype=_torch_dtype(dtype), variant=variant)
    except (OSError, ValueError) as err:
        if is_local:
            raise CLIError(f"could not load the pipeline folder {model!r}: {err}") from err
        raise CLIError(
            f"could not load {model!r}: it is not in the local Hugging Face cache and the Hub is unreachable "
            f"(or HF_HUB_OFFLINE is set). Download it on a connected machine with "
            f"`huggingface-cli download {model}` (then copy the cache or the folder here), "
            f"or pass --model /path/to/an/sdxl-layout/folder."
        ) from err
    return pipe.to(device or _default_device())


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

    device = args.device or _default_device()
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="di-star", description="Diff-Instruct* one-step SDXL tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_generate_parser, _add_demo_parser, _add_export_parser):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CLIError as err:
        print(f"di-star {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
