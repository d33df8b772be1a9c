"""`di-star generate` and `di-star demo` end to end on the tiny local model, and their offline errors."""

import os
import subprocess
import sys
import tempfile

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_di_star import DIStarSDXLPipeline
from diffusers_di_star.cli import main


def test_generate_writes_the_pipeline_images(tiny_sdxl_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--model", str(tiny_sdxl_dir), "--prompt", "a cat", "--prompt", "a dog",
                 "--num-images", "2", "--seed", "5", "--out", str(out), "--device", "cpu"])
    assert code == 0
    written = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in written] == [
        "000005_000_00.png", "000005_000_01.png", "000005_001_00.png", "000005_001_01.png"]
    pipe = DIStarSDXLPipeline.from_pretrained(tiny_sdxl_dir)
    expected = pipe(["a cat", "a dog"], num_images_per_prompt=2, generator=torch.Generator().manual_seed(5)).images
    for path, image in zip(written, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(path)), np.asarray(image))


def test_generate_offline_hub_id_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_di_star.cli", "generate", "--prompt", "a cat", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2
    # Exactly one line of ours (an optional package may print lines of its own; they are not counted).
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("di-star generate: error: ")]
    assert line.startswith("di-star generate: error: --model 'XDG-XHS/distar_long_1step': not in the local Hugging")
    assert "hf download XDG-XHS/distar_long_1step" in line and "a Diffusers pipeline folder" in line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "./missing/folder"], "--model './missing/folder': no such file or folder"),
        (["--num-images", "0"], "--num-images must be in [1, 256]"),
    ],
)
def test_generate_bad_arguments(tmp_path, capsys, argv, message):
    assert main(["generate", "--prompt", "a cat", "--out", str(tmp_path), "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def test_generate_bad_size_is_a_clear_error(tiny_sdxl_dir, tmp_path, capsys):
    code = main(["generate", "--model", str(tiny_sdxl_dir), "--prompt", "a cat", "--height", "100",
                 "--out", str(tmp_path), "--device", "cpu"])
    assert code == 2
    assert "multiples of the VAE factor 8, got 100×64" in capsys.readouterr().err


def test_demo_console_script(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "di-star")
    result = subprocess.run([script, "demo", "--out", str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    grid = PIL.Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * 128, 4 * 128)
    assert str(tmp_path / "grid.png") in result.stdout
    assert DIStarSDXLPipeline.from_pretrained(tmp_path / "tiny-sdxl").conditioning_timestep == 399
    for name in ("tiny-sdxl.safetensors", "tiny-sdxl-unet.safetensors"):
        assert str(tmp_path / "comfyui" / name) in result.stdout and (tmp_path / "comfyui" / name).stat().st_size
    for noise in NOT_ACTIONABLE:  # quiet by default (issue 11)
        assert noise not in result.stderr, result.stderr


#: Library messages a user cannot act on (diffusers_di_star.quiet): torchvision is absent here, so both would show.
NOT_ACTIONABLE = ("should be kept in float32: []", "requires torchvision (not installed)", "cannot run with `cpu`")


def test_fp16_on_cpu_runs_without_the_misleading_library_warnings(tiny_sdxl_dir, tmp_path):
    """diffusers says fp16 "cannot run" on a CPU (four times) and warns on every fp16-VAE upcast: neither is true or
    actionable. A real warning of the same logger still gets through."""
    import logging

    class Records(logging.Handler):
        messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    handler = Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:  # diffusers' and transformers' loggers below these propagate to them
        logger.addHandler(handler)
    try:
        out = tmp_path / "out"
        assert main(["generate", "--model", str(tiny_sdxl_dir), "--prompt", "a cat", "--dtype", "fp16",
                     "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
        assert os.listdir(out) == ["000000_000_00.png"]
        for noise in NOT_ACTIONABLE:
            assert not any(noise in message for message in handler.messages), handler.messages
        logging.getLogger("diffusers.models.modeling_utils").warning("modules that should be kept in float32: ['a'].")
        assert handler.messages[-1] == "modules that should be kept in float32: ['a']."
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def test_generate_prompt_file_in_batches_with_progress_never_overwrites(tiny_sdxl_dir, tmp_path, capsys):
    """--prompt-file, several batches with a progress bar, the same images as one call, and a second run into the
    same --out writes new names instead of replacing the first run's images (issue 11, case 8)."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a cat\n\na dog\na red chair\n")
    out = tmp_path / "out"
    argv = ["generate", "--model", str(tiny_sdxl_dir), "--prompt-file", str(prompt_file), "--batch-size", "2",
            "--seed", "3", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    first = captured.out.split()
    assert [os.path.basename(p) for p in first] == ["000003_000_00.png", "000003_001_00.png", "000003_002_00.png"]
    assert "di-star generate: 100%" in captured.err and "2/2" in captured.err  # two batches: 2 prompts, then 1
    pipe = DIStarSDXLPipeline.from_pretrained(tiny_sdxl_dir)
    generator = torch.Generator().manual_seed(3)  # one generator through the batches, so one call's noise
    expected = pipe(["a cat", "a dog"], generator=generator).images + pipe("a red chair", generator=generator).images
    one_call = pipe(["a cat", "a dog", "a red chair"], generator=torch.Generator().manual_seed(3)).images
    for path, image, same_noise in zip(first, expected, one_call, strict=True):
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(path)), np.asarray(image))
        # batch-size-dependent float rounding only: at most one 8-bit level
        assert np.abs(np.asarray(image, dtype=int) - np.asarray(same_noise, dtype=int)).max() <= 1
    before = {path: open(path, "rb").read() for path in first}
    assert main([*argv, "--prompt", "a fox"]) == 0
    second = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in second] == [
        "000003_000_00-1.png", "000003_001_00-1.png", "000003_002_00-1.png", "000003_003_00.png"]
    assert {path: open(path, "rb").read() for path in first} == before  # the first run's images are untouched


def _bad_input_cases(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    a_file.with_name("empty.txt").write_text("\n  \n")
    generate = ["generate", "--prompt", "a cat", "--model", str(tmp_path / "never-loaded")]
    out = ["--out", str(tmp_path / "out")]
    return [
        ([*generate, "--height", "0", *out], "--height must be >= 1, got 0."),
        ([*generate, "--height", "65536", "--width", "65536", *out], "is 4,294,967,296 pixels, above the limit"),
        ([*generate, "--seed", "-1", *out], "--seed must be in [0, 4294967295], got -1."),
        ([*generate, "--batch-size", "0", *out], "--batch-size must be in [1, 256], got 0."),
        ([*generate, "--out", str(a_file)], "is a file; pass a folder"),
        (["generate", *out], "give at least one --prompt or a --prompt-file."),
        (["generate", "--prompt-file", str(tmp_path / "missing.txt"), *out], "cannot read --prompt-file"),
        (["generate", "--prompt-file", str(a_file.with_name("empty.txt")), *out], "holds no prompt"),
        (["demo", "--out", str(a_file / "sub")], "cannot be created: " + repr(str(a_file)) + " is a file"),
        (["eval", "--model", "m", "--prompts", "parti", "--guidance-scale", "nan", *out],
         "--guidance-scale must be a finite number, got nan."),
        (["eval", "--model", "m", "--prompts", "parti", "--num-prompts", "0", *out], "--num-prompts must be >= 1"),
        (["eval", "--model", "m", "--prompts", "parti", "--out", str(a_file)], "is a file; pass a folder"),
        (["export", "--model", "m", "--format", "kohya-lora", "--lora-alpha", "inf", *out],
         "--lora-alpha must be a finite number, got inf."),
        (["export", "--model", "m", "--format", "kohya-lora", "--lora-alpha", "0", *out], "--lora-alpha must be > 0"),
        (["export", "--model", "m", "--format", "comfyui-unet", "--out", str(a_file / "x.safetensors")],
         "is a file, not a folder"),
        (["bench", "--repeats", "0"], "--repeats must be >= 1, got 0."),
        (["bench", "--batch-sizes", "1,0"], "--batch-sizes must be >= 1, got 0."),
    ]  # fmt: skip


def test_every_command_checks_numbers_and_out_before_loading(tmp_path, capsys, monkeypatch):
    """Issue 11: one line, exit 2, before any model loads (loading would fail differently: the models do not exist)."""
    import diffusers_di_star.runtime as runtime

    monkeypatch.setattr(runtime, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    for argv, message in _bad_input_cases(tmp_path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"di-star {argv[0]}: error: ") and err.count("\n") == 1, err
        assert message in err, (argv, err)
    def read_only(**kwargs):  # what a read-only mount or /proc does, where os.access says yes to root
        raise OSError(30, "Read-only file system", kwargs["dir"])

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert main(["demo", "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert f"cannot be created: writing in {str(tmp_path)!r} failed ([Errno 30] Read-only file system" in err
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # (the tests run as root, who may write anywhere)
    assert main(["demo", "--out", str(tmp_path / "new")]) == 2
    assert f"the folder {str(tmp_path)!r} is not writable" in capsys.readouterr().err


def test_bench_says_what_it_is_doing(capsys, monkeypatch):
    """`di-star bench` prints its settings and each suite as it starts, on stderr (the report stays on stdout)."""
    import diffusers_di_star.benchmarking as benchmarking

    def fake_run(suites, settings, out_dir, on_suite):
        for name in suites:
            on_suite(name)
        return "| report |\n", []

    monkeypatch.setattr(benchmarking, "run_benchmarks", fake_run)
    assert main(["bench", "--quick", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "| report |\n"
    assert captured.err.splitlines() == [
        "di-star bench: flops, inference, training on cpu (reduced modules, 64², --quick)",
        "di-star bench: running flops ...", "di-star bench: running inference ...",
        "di-star bench: running training ...",
    ]
