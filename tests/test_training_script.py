"""``examples/train_di_star_sdxl.py`` end to end on the tiny SDXL: modes, outputs, checkpoints, failures."""

import functools
import importlib.util
import json
import os
import shutil
import types

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
        "--report_to", "none", "--checkpointing_steps", "1000", "--reward", "stub", *extra,
    ]  # fmt: skip


LORA = ["--use_lora", "--generator_lora_rank", "4", "--assistant_lora_rank", "4", "--generator_lora_alpha", "4",
        "--assistant_lora_alpha", "4"]  # fmt: skip


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
        [*LORA, "--divergence", "pseudo_huber", "--cfg_mode", "inner", "--validation_prompts", "a cat"],
        [
            *LORA,
            "--divergence",
            "l2",
            "--cfg_mode",
            "reward",
            "--use_ema",
            "--gradient_accumulation_steps",
            "2",
        ],
        [*LORA, "--divergence", "kl", "--assistant_updates_per_step", "2", "--gradient_checkpointing"],
        [*LORA, "--mixed_precision", "bf16", "--gradient_checkpointing"],  # the paper's precision
    ],
    ids=["lora-pseudo_huber-inner", "lora-l2-reward-ema", "lora-kl", "lora-bf16-checkpointing"],
)
def test_lora_run_loads_in_both_pipelines(script, tiny_sdxl_dir, prompt_file, tmp_path, extra):
    assert run(script, *train_args(tiny_sdxl_dir, prompt_file, tmp_path, *extra)) == 0
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")
    card = (tmp_path / "README.md").read_text()
    assert all(tag in card for tag in ("diffusers", "text-to-image", "di-star"))
    assert ("](images/grid.png)" in card) == ("--validation_prompts" in extra)  # the final validation grid
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
    common = [*LORA, "--assistant_updates_per_step", "2", "--checkpoints_total_limit", "2"]
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
    """The repo was created before training (the early check passed), then the upload fails: every file is kept."""
    import huggingface_hub

    api = huggingface_hub.HfApi(endpoint="http://127.0.0.1:9")
    created = []
    def create_repo(repo_id, **kwargs):
        created.append(repo_id)
        return types.SimpleNamespace(repo_id=repo_id)

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", api.upload_folder)
    args = train_args(
        tiny_sdxl_dir,
        prompt_file,
        tmp_path,
        *LORA,
        "--max_train_steps",
        "1",
        "--push_to_hub",
        "--hub_model_id",
        "someone/di-star-test",
        "--hub_token",
        "hf_dummy_secret",
    )
    assert run(script, *args) == 1
    assert created[0] == "someone/di-star-test"  # before training, and again by the final push
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors") and os.path.isfile(tmp_path / "README.md")
    assert "hf upload someone/di-star-test" in caplog.text
    assert "hf_dummy_secret" not in caplog.text
    assert "hf_dummy_secret" not in "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ("caption\na cat\n", [], "no column 'prompt'"),
        ("prompt\na cat\n", ["--resolution", "60"], "resolution"),
        ("prompt\na cat\n", ["--divergence", "kl", "--huber_c", "0"], "huber_c"),
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


# --- issue 11: nothing lost, nothing silent -------------------------------------------------------------------------


def test_killed_save_keeps_the_previous_checkpoint_and_latest_resumes_it(
    script, tiny_sdxl_dir, prompt_file, tmp_path, monkeypatch, caplog
):
    """Case 1: --checkpoints_total_limit 1, the save of checkpoint-2 dies half-way; latest resumes checkpoint-1."""
    from accelerate import Accelerator

    common = [*LORA, "--checkpointing_steps", "1", "--checkpoints_total_limit", "1"]
    assert run(script, *train_args(tiny_sdxl_dir, prompt_file, tmp_path, *common, "--max_train_steps", "1")) == 0
    save_state = Accelerator.save_state

    def killed(self, folder, *args, **kwargs):
        open(os.path.join(folder, "optimizer.bin"), "wb").close()  # half a checkpoint, then the "kill"
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(Accelerator, "save_state", killed)
    resume = ["--resume_from_checkpoint", "latest"]
    with pytest.raises(KeyboardInterrupt):
        run(script, *train_args(tiny_sdxl_dir, prompt_file, tmp_path, *common, *resume, "--max_train_steps", "3"))
    assert script.checkpoint_dirs(str(tmp_path)) == ["checkpoint-1"]
    assert os.path.isdir(tmp_path / "checkpoint-2.tmp")

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    caplog.set_level("INFO")
    args = train_args(tiny_sdxl_dir, prompt_file, tmp_path, *common, *resume, "--max_train_steps", "3")
    assert run(script, *args) == 0
    assert "checkpoint-2.tmp is half-written" in caplog.text and "at step 1" in caplog.text
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == ["checkpoint-3"]


def test_output_dir_of_another_run_is_refused_unless_overwritten(script, tiny_sdxl_dir, prompt_file, tmp_path):
    """Case 2: a full run into a LoRA run's folder stops before loading; --overwrite_output_dir replaces that run."""
    assert run(script, *train_args(tiny_sdxl_dir, prompt_file, tmp_path, *LORA, "--max_train_steps", "1")) == 0
    with pytest.raises(ValueError, match="already holds a run .*checkpoint-1.*--overwrite_output_dir"):
        script.parse_args(train_args(str(tmp_path / "no-model"), prompt_file, tmp_path))
    full = ["--overwrite_output_dir", "--learning_rate", "1e-3", "--max_train_steps", "2"]
    assert run(script, *train_args(tiny_sdxl_dir, prompt_file, tmp_path, *full)) == 0
    assert script.checkpoint_dirs(str(tmp_path)) == ["checkpoint-2"]
    manifest = json.loads((tmp_path / "checkpoint-2" / "di_star_checkpoint.json").read_text())
    assert manifest["settings"]["use_lora"] is False


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl_dir, prompt_file, tmp_path_factory):
    """A finished 2-step LoRA run with EMA and checkpoint-1, checkpoint-2 (copied per test, never changed)."""
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("lora-run") / "run"
    module = load_script()
    module.load_reward = lambda spec: PatternReward().freeze()
    AcceleratorState._reset_state(reset_partial_state=True)
    args = train_args(tiny_sdxl_dir, prompt_file, out, *LORA, "--use_ema", "--checkpointing_steps", "1")
    assert module.main(module.parse_args(args)) == 0
    return out


def copy_run(lora_run, tmp_path):
    shutil.copytree(lora_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize(
    "flags, flag, saved, given",
    [
        ([*LORA, "--use_ema", "--generator_lora_alpha", "8"], "--generator_lora_alpha", "4.0", "8.0"),
        ([*LORA, "--use_ema", "--assistant_lora_rank", "8"], "--assistant_lora_rank", "4", "8"),
        (LORA, "--use_ema", "True", "False"),
        (["--use_ema"], "--use_lora", "True", "False"),
    ],
)
def test_resume_with_other_settings_stops_before_training(
    script, tiny_sdxl_dir, prompt_file, lora_run, tmp_path, monkeypatch, flags, flag, saved, given
):
    """Case 4: one line naming the flag, the saved and the given value; nothing is loaded or trained."""
    out = copy_run(lora_run, tmp_path)
    monkeypatch.setattr(script, "load_prompts", lambda *a, **k: pytest.fail("data loaded before the settings check"))
    args = train_args(tiny_sdxl_dir, prompt_file, out, *flags, "--resume_from_checkpoint", "latest")
    with pytest.raises(ValueError) as error:
        run(script, *args)
    assert str(error.value).startswith(f"{flag}: checkpoint-2 was trained with {saved}, this run gives {given}")


def test_corrupt_checkpoint_file_names_itself_and_the_previous_checkpoint(
    script, tiny_sdxl_dir, prompt_file, lora_run, tmp_path
):
    out = copy_run(lora_run, tmp_path)
    damaged = out / "checkpoint-2" / "generator" / "pytorch_lora_weights.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    args = train_args(tiny_sdxl_dir, prompt_file, out, *LORA, "--use_ema", "--resume_from_checkpoint", "latest")
    with pytest.raises(ValueError, match=f"{damaged} is damaged .*previous intact checkpoint is checkpoint-1"):
        run(script, *args)


def test_a_checkpoint_holding_code_is_refused(script, tiny_sdxl_dir, prompt_file, lora_run, tmp_path):
    """Resuming never unpickles code: a pickle that would run code (sizes faked to match) is named and refused."""
    out = copy_run(lora_run, tmp_path)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    optimizer = out / "checkpoint-2" / "optimizer.bin"
    torch.save({"state": Payload(), "param_groups": []}, optimizer)
    manifest_path = out / "checkpoint-2" / "di_star_checkpoint.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["optimizer.bin"] = optimizer.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    args = train_args(tiny_sdxl_dir, prompt_file, out, *LORA, "--use_ema", "--resume_from_checkpoint", "latest")
    with pytest.raises(ValueError, match=f"{optimizer} holds Python objects.*could run code.*checkpoint-1"):
        run(script, *args)
    assert not marker.exists()
    # accelerate's own custom-state pickle (read with weights_only=False) is refused as a file the trainer never writes
    torch.save({}, out / "checkpoint-1" / "custom_checkpoint_0.pkl")
    args[args.index("latest")] = str(out / "checkpoint-1")
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl was not written by this trainer"):
        run(script, *args)


def test_ema_is_stored_as_safetensors(lora_run):
    from safetensors import safe_open

    with safe_open(str(lora_run / "checkpoint-2" / "ema.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["state"])["optimization_step"] == 2
        assert len(list(f.keys())) > 0
    assert not list(lora_run.rglob("custom_checkpoint_*"))


def test_non_finite_stop_does_not_claim_a_checkpoint(script, tiny_sdxl_dir, prompt_file, tmp_path, monkeypatch):
    """Case 9: with no checkpoint saved yet, the message says so."""
    from diffusers_di_star.training.engine import optimisation_step

    never_finite = functools.partial(optimisation_step, finite=lambda accelerator, *values: False)
    monkeypatch.setattr(script, "optimisation_step", never_finite)
    args = train_args(tiny_sdxl_dir, prompt_file, tmp_path, *LORA, "--max_skipped_steps", "2")
    with pytest.raises(script.TrainingStopped, match="2 non-finite steps in a row: stopping; no checkpoint was saved"):
        run(script, *args)


def test_push_to_hub_offline_fails_before_training(script, tiny_sdxl_dir, prompt_file, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(script, "load_prompts", lambda *a, **k: pytest.fail("training started"))
    args = train_args(tiny_sdxl_dir, prompt_file, tmp_path, *LORA, "--push_to_hub", "--hub_model_id", "someone/x")
    assert script.cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_di_star_sdxl.py: error: --push_to_hub: cannot create or reach the Hub repo")
    assert err.count("\n") == 1 and "Nothing was trained" in err
    assert not any(name.startswith("checkpoint") for name in os.listdir(tmp_path))


def test_reward_scale_zero_card_claims_no_reward(script, tiny_sdxl_dir, prompt_file, tmp_path):
    """Case 5, through the trainer: no reward, the local base path in the text once and not in the metadata."""
    args = train_args(tiny_sdxl_dir, prompt_file, tmp_path, *LORA, "--reward_scale", "0", "--reward", "pickscore")
    assert run(script, *args) == 0
    card = (tmp_path / "README.md").read_text()
    metadata = card.split("---")[1]
    assert "pickscore" not in card and "without a reward" in card
    assert "base_model" not in metadata and card.count(tiny_sdxl_dir) == 2  # the text, and the LoRA usage code
