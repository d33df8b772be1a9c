"""``examples/train_di_star_sdxl.py`` end to end on the tiny SDXL: modes, outputs, checkpoints, failures."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline
from training_helpers import PatternReward

from diffusers_di_star import DIStarSDXLPipeline
from diffusers_di_star.testing import TINY_PROMPTS

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_di_star_sdxl.py")


def load_script():
    spec = importlib.util.spec_from_file_location("train_di_star_sdxl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(autouse=True)
def one_thread_and_stub_reward(script, monkeypatch):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # each in-process run is a fresh `accelerate launch`
    monkeypatch.setattr(script, "load_reward", lambda spec: PatternReward().freeze())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.txt"
    path.write_text("\n".join(TINY_PROMPTS) + "\n")
    return str(path)


def train_args(model, prompts, out, *extra):
    return [
        "--pretrained_model_name_or_path", model, "--train_data_file", prompts, "--output_dir", str(out),
        "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-2",
        "--report_to", "none", "--checkpointing_steps", "1000", "--reward", "stub",
        "--generator_lora_rank", "4", "--assistant_lora_rank", "4", "--generator_lora_alpha", "4",
        "--assistant_lora_alpha", "4", *extra,
    ]  # fmt: skip


def run(script, *args):
    return script.main(script.parse_args(list(args)))


def one_step_images(pipe_class, model, lora_dir=None, **kwargs):
    pipe = pipe_class.from_pretrained(model, **kwargs)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    call = {"timesteps": [399], "guidance_scale": 0.0} if pipe_class is StableDiffusionXLPipeline else {}
    if pipe_class is StableDiffusionXLPipeline:
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    return pipe(list(TINY_PROMPTS[:2]), height=64, width=64, generator=generator, output_type="np", **call).images


@pytest.mark.parametrize(
    "extra",
    [
        ["--use_lora", "--divergence", "pseudo_huber", "--cfg_mode", "inner", "--validation_prompts", "a cat"],
        [
            "--use_lora",
            "--divergence",
            "l2",
            "--cfg_mode",
            "reward",
            "--use_ema",
            "--gradient_accumulation_steps",
            "2",
        ],
        ["--use_lora", "--divergence", "kl", "--assistant_updates_per_step", "2", "--gradient_checkpointing"],
        ["--use_lora", "--mixed_precision", "bf16", "--gradient_checkpointing"],  # the paper's precision
    ],
    ids=["lora-pseudo_huber-inner", "lora-l2-reward-ema", "lora-kl", "lora-bf16-checkpointing"],
)
def test_lora_run_loads_in_both_pipelines(script, tiny_sdxl_dir, prompt_file, tmp_path, extra):
    assert run(script, *train_args(tiny_sdxl_dir, prompt_file, tmp_path, *extra)) == 0
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")
    card = (tmp_path / "README.md").read_text()
    assert all(tag in card for tag in ("diffusers", "text-to-image", "di-star"))
    assert "hub_token" not in json.loads((tmp_path / "training_args.json").read_text())
    before = one_step_images(DIStarSDXLPipeline, tiny_sdxl_dir)
    ours = one_step_images(DIStarSDXLPipeline, tiny_sdxl_dir, tmp_path)
    plain = one_step_images(StableDiffusionXLPipeline, tiny_sdxl_dir, tmp_path)
    assert np.abs(ours - before).max() > 1e-3
    np.testing.assert_allclose(ours, plain, atol=1e-4)


def test_full_run_writes_a_pipeline(script, tiny_sdxl_dir, prompt_file, tmp_path):
    extra = ["--validation_prompts", "a cat", "--learning_rate", "1e-3"]
    assert run(script, *train_args(tiny_sdxl_dir, prompt_file, tmp_path, *extra)) == 0
    assert os.path.isfile(tmp_path / "images" / "000.png")
    ours = one_step_images(DIStarSDXLPipeline, str(tmp_path))
    plain = one_step_images(StableDiffusionXLPipeline, str(tmp_path))
    before = one_step_images(DIStarSDXLPipeline, tiny_sdxl_dir)
    assert DIStarSDXLPipeline.from_pretrained(str(tmp_path)).conditioning_timestep == 399
    assert np.abs(ours - before).max() > 1e-3
    np.testing.assert_allclose(ours, plain, atol=1e-4)


def lora_tensors(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))


def test_resume_equals_uninterrupted_run_and_total_limit(script, tiny_sdxl_dir, prompt_file, tmp_path):
    common = ["--use_lora", "--assistant_updates_per_step", "2", "--checkpoints_total_limit", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert (
        run(
            script,
            *train_args(
                tiny_sdxl_dir, prompt_file, straight, *common, "--checkpointing_steps", "1", "--max_train_steps", "3"
            ),
        )
        == 0
    )
    assert script.checkpoint_dirs(str(straight)) == ["checkpoint-2", "checkpoint-3"]
    assert not any(name.endswith(".tmp") for name in os.listdir(straight))

    assert run(script, *train_args(tiny_sdxl_dir, prompt_file, resumed, *common, "--max_train_steps", "2")) == 0
    assert (
        run(
            script,
            *train_args(
                tiny_sdxl_dir,
                prompt_file,
                resumed,
                *common,
                "--max_train_steps",
                "3",
                "--resume_from_checkpoint",
                "latest",
            ),
        )
        == 0
    )
    expected, actual = lora_tensors(straight), lora_tensors(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_push_to_unreachable_hub_fails_cleanly(script, tiny_sdxl_dir, prompt_file, tmp_path, monkeypatch, caplog):
    import huggingface_hub

    api = huggingface_hub.HfApi(endpoint="http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub, "create_repo", api.create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", api.upload_folder)
    args = train_args(
        tiny_sdxl_dir,
        prompt_file,
        tmp_path,
        "--use_lora",
        "--max_train_steps",
        "1",
        "--push_to_hub",
        "--hub_model_id",
        "someone/di-star-test",
        "--hub_token",
        "hf_dummy_secret",
    )
    assert run(script, *args) == 1
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors") and os.path.isfile(tmp_path / "README.md")
    assert "hf upload someone/di-star-test" in caplog.text
    assert "hf_dummy_secret" not in caplog.text
    assert "hf_dummy_secret" not in "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ("caption\na cat\n", [], "no column 'prompt'"),
        ("prompt\na cat\n", ["--resolution", "60"], "resolution"),
        ("prompt\na cat\n", ["--divergence", "kl", "--weighting", "snr"], "weighting"),
        ("prompt\na cat\n", ["--checkpoints_total_limit", "0"], "checkpoints_total_limit"),
    ],
)
def test_bad_data_and_flags_fail_before_models_load(script, tmp_path, content, extra, message):
    data = tmp_path / "prompts.csv"
    data.write_text(content)
    missing_model = str(tmp_path / "no-such-model")  # any model access would fail with a different error
    with pytest.raises(ValueError, match=message):
        run(script, *train_args(missing_model, str(data), tmp_path / "out", *extra))
    assert not os.path.exists(tmp_path / "out" / "checkpoint-1")


def test_unknown_choice_is_rejected(script, tmp_path):
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--divergence", "js"])
