"""`di-star generate` and `di-star demo` end to end on the tiny local model, and their offline errors."""

import os
import subprocess
import sys

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
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("di-star generate: error: could not load 'XDG-XHS/distar_long_1step'")
    assert "huggingface-cli download XDG-XHS/distar_long_1step" in last_line and "--model /path" in last_line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "./missing/folder"], "is neither a local folder nor a Hub id"),
        (["--num-images", "0"], "--num-images must be >= 1"),
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
