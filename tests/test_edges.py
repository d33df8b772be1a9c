"""The roots of the edge cases (one error base, one source resolver, one set of DI* defaults) and the edges."""

import errno
import math
import os
import re
import warnings

import pytest
from test_training_script import load_script

from diffusers_di_star.cli import main
from diffusers_di_star.errors import DIStarError, first_line
from diffusers_di_star.sources import is_hub_id, load_failure, reward_load_failure
from diffusers_di_star.training import DIStarConfig


@pytest.fixture(scope="module")
def script():
    return load_script()


def test_one_set_of_defaults(script, tmp_path):
    args = script.parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o")])
    config = DIStarConfig()
    for name in script.CONFIG_FLAGS:
        assert getattr(args, name) == getattr(config, name), name
    # LoRA alpha: the rank unless given, in the library as in the trainer.
    assert DIStarConfig(generator_lora_rank=8).generator_lora_alpha == 8.0
    args = script.parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o"),
                              "--use_lora", "--rank", "8"])  # fmt: skip
    assert script.make_config(args).generator_lora_alpha == 8.0 == script.make_config(args).assistant_lora_alpha
    with pytest.raises(SystemExit):  # the config's choices are the flag's: argparse names them
        script.parse_args(["--pretrained_model_name_or_path", "m", "--weighting", "snr"])


def test_first_line_and_the_base_class():
    assert first_line(ValueError("\n  first\nsecond")) == "first" and first_line(KeyError()) == "KeyError"
    from diffusers_di_star.errors import ModelLoadError
    from diffusers_di_star.export import ExportError
    from diffusers_di_star.training.checkpointing import CheckpointError
    from diffusers_di_star.weights import CheckpointError as WeightsError

    assert all(issubclass(cls, DIStarError) for cls in (ExportError, ModelLoadError, CheckpointError, WeightsError))


def test_local_paths_never_get_hub_advice(tmp_path, capsys):
    weights = tmp_path / "unet.safetensors"
    weights.write_bytes(b"x" * 16)
    assert not is_hub_id(str(weights)) and is_hub_id("owner/name") and not is_hub_id("a/b/c")
    assert load_failure("--model", "owner/name", OSError("offline"), "a folder").endswith(
        "Download it on a connected machine with `hf download owner/name`, or pass a folder (a local path)."
    )
    message = load_failure("--model", str(weights), OSError("bad"), "a folder")
    assert message == f"--model {str(weights)!r} is not a folder (bad)."
    out = str(tmp_path / "out.safetensors")
    assert main(["export", "--model", str(weights), "--format", "comfyui-checkpoint", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "is a single file; this needs a Diffusers folder holding model_index.json" in err
    assert "hf download" not in err
    # A reward checkpoint given as a local copy that cannot be read: that copy is named, no download advice.
    message = reward_load_failure("pickscore", {"pickscore": {"model": str(tmp_path)}}, OSError("no config"), "--r")
    assert message == f"--reward 'pickscore': could not load it with --r pickscore.model={tmp_path} (no config)."
    message = reward_load_failure("pickscore", {}, OSError("offline"), "--reward-option")
    assert "`hf download yuvalkirstain/PickScore_v1`" in message and "--reward-option pickscore.model=PATH" in message
    assert main(["eval", "--model", "m", "--prompts", "p", "--out", str(tmp_path / "e"),
                 "--reward-option", "pickscore.model=./nope"]) == 2  # fmt: skip
    assert "--reward-option pickscore.model=./nope: no such file or folder" in capsys.readouterr().err


def test_ctrl_c_in_eval_says_how_to_resume(monkeypatch, tmp_path, capsys):
    import diffusers_di_star.evaluation as evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "load_prompt_set", interrupted)
    assert main(["eval", "--model", "m", "--prompts", "p", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == (
        "di-star eval: interrupted: finished images are kept, rerun the same command to resume."
    )
    assert os.listdir(tmp_path) == []


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_in_generate_names_the_image(tmp_path, monkeypatch):
    """(Export: test_export.py::test_failed_write_leaves_no_partial_file_and_keeps_the_old_one.)"""
    from PIL import Image

    import diffusers_di_star.cli as cli

    monkeypatch.setattr(Image.Image, "save", enospc)
    with pytest.raises(cli.CLIError, match=f"disk full at {tmp_path}: .*000.png was not written"):
        cli._save_new_png(Image.new("RGB", (8, 8)), str(tmp_path / "000.png"))
    assert os.listdir(tmp_path) == []


def test_trainer_disk_full_names_the_intact_checkpoint(script, tiny_sdxl_dir, tmp_path, monkeypatch, caplog):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from test_training_script import LORA, run, train_args
    from training_helpers import PatternReward

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(script, "load_reward", lambda spec: PatternReward().freeze())
    save_state, calls = Accelerator.save_state, []

    def full_at_second_save(self, folder, *args, **kwargs):
        calls.append(folder)
        return enospc() if len(calls) == 2 else save_state(self, folder, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_at_second_save)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    caplog.set_level("INFO")
    args = train_args(tiny_sdxl_dir, str(prompts), tmp_path / "out", *LORA, "--checkpointing_steps", "1")
    with pytest.raises(script.TrainingStopped) as stopped:
        run(script, *args)
    assert str(stopped.value) == (
        f"disk full at {tmp_path / 'out'}: checkpoint-2 was not written (OSError: [Errno 28] No space left on "
        "device); the last checkpoint, checkpoint-1, is intact (--resume_from_checkpoint latest). Free some space "
        "(or use --checkpoints_total_limit)."
    )
    # What the failed save wrote is removed (it frees space); checkpoint-1 stays the newest.
    assert sorted(name for name in os.listdir(tmp_path / "out") if name.startswith("checkpoint")) == ["checkpoint-1"]
    assert "Saving current state" not in caplog.text and "saved " in caplog.text  # one line of ours per save


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "a", "--num-images", "100000000"], "--num-images must be in [1, 256]"),
        (["generate", "--prompt", "a", "--prompt", "b", "--num-images", "200", "--batch-size", "2"],
         "--num-images 200 × --batch-size 2 is more than 256 images in one pipeline call"),
        (["generate", "--prompt", "a", "--device", "cudaa"], "--device 'cudaa' is not a device"),
        (["bench", "--device", "cuda:0"], "--device 'cuda:0': no cuda device is available here; pass --device cpu."),
        (["eval", "--model", "m", "--prompts", "p", "--metrics", ""], "--metrics is empty: name at least one reward"),
        (["eval", "--model", "m", "--prompts", "p", "--metrics", " , "], "--metrics is empty"),
    ],
)  # fmt: skip
def test_cli_edges_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    import diffusers_di_star.runtime as runtime

    monkeypatch.setattr(runtime, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_damaged_single_file_is_one_line(tiny_sdxl_dir, tmp_path, capsys):
    weights = os.path.join(tiny_sdxl_dir, "unet", "diffusion_pytorch_model.safetensors")
    truncated = tmp_path / "unet.safetensors"
    truncated.write_bytes(open(weights, "rb").read()[:1000])
    for fmt in ("comfyui-unet", "diffusers"):
        argv = ["export", "--model", str(truncated), "--format", fmt, "--out", str(tmp_path / f"o-{fmt}")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"di-star export: error: {str(truncated)!r} is damaged or not a safetensors file (")
        assert err.count("\n") == 1


def test_trainer_edges(script, tmp_path):
    with pytest.raises(ValueError, match="--output_dir is empty: pass a folder"):
        script.parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", ""])
    from diffusers_di_star.training import load_prompts

    (tmp_path / "header.csv").write_text("prompt\n")
    with pytest.raises(ValueError, match=r"--train_data_file '.*header.csv' holds no prompts"):
        load_prompts(None, str(tmp_path / "header.csv"))


def test_pipeline_refuses_float_sizes_nan_latents_and_huge_batches(tiny_components):
    import torch

    from diffusers_di_star import DIStarSDXLPipeline

    pipe = DIStarSDXLPipeline(**tiny_components)
    with pytest.raises(ValueError, match="`height` must be an integer number of pixels, got the float 64.0"):
        pipe("a", height=64.0, width=64)
    latents = torch.full((1, 4, 8, 8), float("nan"))
    with pytest.raises(ValueError, match="`latents` hold NaN or infinite values"):
        pipe("a", height=64, width=64, latents=latents)
    with pytest.raises(ValueError, match=r"1,000,000,000 images in one call .* above the limit of 256"):
        pipe("a", height=64, width=64, num_images_per_prompt=10**9)


def test_a_very_long_prompt_gets_one_short_truncation_notice(tiny_components):
    import logging

    import torch

    from diffusers_di_star import DIStarSDXLPipeline
    from diffusers_di_star.quiet import TRUNCATION_LOGGER

    class Collect(logging.Handler):
        def emit(self, record):
            notices.append(record.getMessage())

    notices, handler = [], Collect()
    logging.getLogger(TRUNCATION_LOGGER).addHandler(handler)  # after the logger's filters, as any handler
    pipe = DIStarSDXLPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe(" ".join(["cat"] * 20_000), height=64, width=64, generator=torch.Generator().manual_seed(0))
    finally:
        logging.getLogger(TRUNCATION_LOGGER).removeHandler(handler)
    assert len(notices) == 1 and len(notices[0]) < 300, notices  # (two text encoders, one notice)
    head, _, shown = notices[0].partition(" tokens: ")
    assert head.endswith("up to 77") and re.fullmatch(r"\['cat.{75}… \(\d{2,3},\d{3} characters in all\)", shown)


def test_pipeline_without_scheduler_lcm_unets_and_ip_adapter(tiny_components, tmp_path):
    import numpy as np
    import torch
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from diffusers_di_star import DIStarSDXLPipeline

    # scheduler=None builds (as plain SDXL does: diffusers' test_encode_prompt_works_in_isolation needs it), in the
    # constructor and in from_pretrained; a call then says what is missing.
    pipe = DIStarSDXLPipeline(**{**tiny_components, "scheduler": None})
    assert pipe.scheduler is None and pipe.encode_prompt("a cat", do_classifier_free_guidance=False)[0].ndim == 3
    with pytest.raises(ValueError, match=r"no scheduler \(scheduler=None\)"):
        pipe("a cat", height=64, width=64)
    DIStarSDXLPipeline(**tiny_components).save_pretrained(tmp_path)
    assert DIStarSDXLPipeline.from_pretrained(tmp_path, scheduler=None).scheduler is None

    with pytest.raises(NotImplementedError, match="does not support IP-Adapters"):
        DIStarSDXLPipeline(**tiny_components).load_ip_adapter("h94/IP-Adapter", subfolder="sdxl_models")

    # A UNet with time_cond_proj_dim (the LCM-distilled layout) gets the guidance embedding as SDXL + LCM gives it.
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(tiny_components["unet"].config, time_cond_proj_dim=16)
    assert unet.config.time_cond_proj_dim == 16
    components = {**tiny_components, "unet": unet}
    scheduler = LCMScheduler.from_config(components["scheduler"].config)
    reference = StableDiffusionXLPipeline(**{**components, "scheduler": scheduler}, add_watermarker=False)
    ours = DIStarSDXLPipeline(**components, add_watermarker=False)
    for pipe in (reference, ours):
        pipe.set_progress_bar_config(disable=True)
    for guidance_scale in (0.0, 6.0):
        call = {"height": 64, "width": 64, "output_type": "np", "guidance_scale": guidance_scale}
        theirs = reference(["a cat"], num_inference_steps=1, timesteps=[399], generator=gen(), **call).images
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # guidance_scale is used, not "ignored", for this UNet
            mine = ours(["a cat"], generator=gen(), **call).images
        assert np.abs(mine - theirs).max() <= 1e-5, guidance_scale
    # (and the embedding matters: the default w differs from the last one)
    assert np.abs(ours(["a cat"], generator=gen(), height=64, width=64, output_type="np").images - theirs).max() > 1e-3


def gen():
    import torch

    return torch.Generator().manual_seed(0)


def test_a_trained_lora_run_folder_is_a_model(tiny_sdxl_dir, tmp_path, capsys):
    """generate and export take a LoRA run folder: its LoRA on the base model named in its training_args.json."""
    import json

    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    from diffusers_di_star import DIStarSDXLPipeline
    from diffusers_di_star.export import load_generator_unet
    from diffusers_di_star.runtime import load_pipeline

    base = DIStarSDXLPipeline.from_pretrained(tiny_sdxl_dir)
    base.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False))
    run = tmp_path / "run"
    StableDiffusionXLPipeline.save_lora_weights(run, unet_lora_layers=get_peft_model_state_dict(base.unet))
    (run / "training_args.json").write_text(json.dumps(
        {"use_lora": True, "pretrained_model_name_or_path": tiny_sdxl_dir, "conditioning_timestep": 500}
    ))  # fmt: skip
    expected = DIStarSDXLPipeline.from_pretrained(tiny_sdxl_dir, conditioning_timestep=500)
    expected.load_lora_weights(str(run))
    call = {"height": 64, "width": 64, "output_type": "np"}
    pipe = load_pipeline(str(run), device="cpu")
    assert pipe.conditioning_timestep == 500
    images = [p("a cat", generator=torch.Generator().manual_seed(0), **call).images for p in (pipe, expected)]
    np.testing.assert_array_equal(images[0], images[1])

    out = tmp_path / "unet.safetensors"
    assert main(["export", "--model", str(run), "--format", "comfyui-unet", "--dtype", "fp32", "--out", str(out)]) == 0
    expected.fuse_lora()
    expected.unload_lora_weights()  # (the fused weights stay)
    fused = expected.unet.state_dict()
    exported = load_generator_unet(str(out), base_model=tiny_sdxl_dir).state_dict()
    assert max((exported[k] - v).abs().max().item() for k, v in fused.items()) < 1e-6
    plain = load_file(os.path.join(tiny_sdxl_dir, "unet", "diffusion_pytorch_model.safetensors"))
    assert max((exported[k] - plain[k]).abs().max().item() for k in plain) > 1e-3  # the LoRA is in it
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["di_star.conditioning_timestep"] == "500"  # the run's t*, not the default


def test_each_step_logs_every_loss_term_the_reward_and_both_grad_norms_and_lrs(
    script, tiny_sdxl_dir, tmp_path, monkeypatch
):
    """docs/training.md's logging claim, on a recording tracker (accelerate's `log`), with every term switched on."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from test_training_script import run, train_args
    from training_helpers import PatternReward

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(script, "load_reward", lambda spec: PatternReward().freeze())
    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: logged.append((step, values)))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    args = train_args(tiny_sdxl_dir, str(prompts), tmp_path / "out", "--cfg_mode", "reward")
    assert run(script, *args) == 0
    assert [step for step, _ in logged] == [1, 2]
    for _, values in logged:
        assert set(values) == {
            "assistant_loss", "generator_loss", "reward_loss", "divergence_loss", "cfg_reward_loss", "reward",
            "assistant_grad_norm", "generator_grad_norm", "lr", "assistant_lr", "images_per_second",
        }  # fmt: skip
        assert all(isinstance(value, float) and math.isfinite(value) for value in values.values()), values


def test_without_tensorboard_the_run_stops_at_start(script, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    missing = lambda name, *a: None if name == "tensorboard" else find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    with pytest.raises(ValueError, match="--report_to tensorboard needs the tensorboard package"):
        script.parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "o")])
