"""The trainer's user errors: one line ``train_di_star_sdxl.py: error: …``, exit 2, raised before any model loads."""

import argparse
import errno
import os
import subprocess
import sys
import tempfile

import pytest
from test_training_script import LORA, load_script, train_args

from diffusers_di_star.hub import write_model_card
from diffusers_di_star.testing import TINY_PROMPTS
from diffusers_di_star.training import checkpointing, load_prompts


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(autouse=True)
def fresh_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(TINY_PROMPTS) + "\n")
    return str(path)


def one_line_error(script, capsys, args):
    assert script.cli(args) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]  # (datasets' progress bars may come before, on stderr)
    assert last.startswith("train_di_star_sdxl.py: error: ") and "Traceback" not in err, err
    return last.removeprefix("train_di_star_sdxl.py: error: ")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--generator_lora_rank", "4"], "--generator_lora_rank only apply to LoRA training: add --use_lora"),
        (["--rank", "4"], "--rank only apply to LoRA training"),
        (["--guidance_scale", "nan"], "--guidance_scale must be a finite number, got nan"),
        (["--learning_rate=-1e-4"], "--learning_rate must be in (0, inf), got -0.0001"),
        (["--adam_beta2", "1.5"], "--adam_beta2 must be in [0, 1), got 1.5"),
        (["--max_train_steps", "3", "--num_train_epochs", "1"], "pass one"),
        (["--resume_from_checkpoint", "latest", "--overwrite_output_dir"], "pass one"),
    ],
)
def test_bad_flags_are_one_line_errors_before_models_load(script, capsys, tmp_path, prompts, extra, message):
    missing_model = str(tmp_path / "no-such-model")  # any model access would give another error
    assert message in one_line_error(script, capsys, train_args(missing_model, prompts, tmp_path / "out", *extra))


def test_unknown_lr_scheduler_is_refused(script):
    with pytest.raises(SystemExit):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--lr_scheduler", "cosine_restart"])


def test_output_dir_that_is_a_file(script, capsys, tmp_path, prompts):
    (tmp_path / "out").write_text("")
    err = one_line_error(script, capsys, train_args("x", prompts, tmp_path / "out"))
    assert err.startswith(f"--output_dir '{tmp_path / 'out'}' is a file")


def test_output_dir_where_nothing_can_be_written(script, capsys, tmp_path, prompts, monkeypatch):
    """A read-only mount (or /proc) passes os.access for root: writing is tried, and the run stops in one line."""

    def read_only(**kwargs):
        raise OSError(30, "Read-only file system", kwargs["dir"])

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    out = tmp_path / "out" / "run"
    err = one_line_error(script, capsys, train_args("x", prompts, out))
    assert err.startswith(f"--output_dir '{out}' cannot be created: writing in '{tmp_path}' failed")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "model, message",
    [
        ("./no/such-folder", "--pretrained_model_name_or_path './no/such-folder': no such file or folder"),
        ("someone/sdxl", "not in the local Hugging Face cache and the Hub is unreachable"),
    ],
)
def test_missing_model_is_one_line_and_local_paths_are_not_hub_ids(script, capsys, tmp_path, prompts, model, message):
    err = one_line_error(script, capsys, train_args(model, prompts, tmp_path / "out"))
    assert message in err
    assert ("hf download someone/sdxl" in err) == (model == "someone/sdxl")


def test_lora_targets_that_match_nothing(script, capsys, tiny_sdxl_dir, tmp_path, prompts):
    args = train_args(tiny_sdxl_dir, prompts, tmp_path / "out", *LORA, "--assistant_lora_target_modules", "to_q,attn9")
    err = one_line_error(script, capsys, args)
    assert err.startswith("--assistant_lora_target_modules: 'attn9' matches no module of the UNet")


def test_fp16_on_a_cpu(script, capsys, tiny_sdxl_dir, tmp_path, prompts):
    args = train_args(tiny_sdxl_dir, prompts, tmp_path / "o", "--mixed_precision", "fp16")
    expected = "--mixed_precision fp16 needs a GPU; on a CPU use --mixed_precision bf16 or no."
    assert one_line_error(script, capsys, args) == expected


def test_debug_shows_the_traceback(script, tmp_path, prompts):
    with pytest.raises(ValueError, match="finite"):
        script.cli(train_args("x", prompts, tmp_path / "o", "--guidance_scale", "inf", "--debug"))


def test_the_script_itself_prints_one_line_and_exits_2(tmp_path, prompts):
    command = [sys.executable, load_script().__file__, *train_args("x", prompts, tmp_path / "o", "--rank", "4")]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("train_di_star_sdxl.py: error: --rank only apply")
    assert "Traceback" not in result.stderr


def test_familiar_aliases(script, tmp_path, prompts):
    args = script.parse_args([
        "--pretrained_model_name_or_path", "x", "--train_data_file", prompts, "--output_dir", str(tmp_path),
        "--report_to", "none", "--use_lora", "--rank", "8", "--caption_column", "caption",
        "--validation_prompt", "a cat", "--validation_prompt", "a dog", "--num_train_epochs", "2",
        "--assistant_lora_rank", "2",
    ])  # fmt: skip
    assert (args.generator_lora_rank, args.generator_lora_alpha) == (8, 8.0)
    assert (args.assistant_lora_rank, args.assistant_lora_alpha) == (2, 2.0)
    assert args.prompt_column == "caption" and args.validation_prompts == ["a cat", "a dog"]
    from accelerate import PartialState

    PartialState()  # the trainer's logger needs accelerate's state
    script.resolve_max_train_steps(args, num_prompts=9, num_processes=2)  # 1 × 2 prompts a step: ⌈9 / 2⌉ = 5 an epoch
    assert args.max_train_steps == 10


def test_offline_reward_names_the_repo_and_the_local_option(script):
    with pytest.raises(ValueError) as error:
        script.load_reward("pickscore")
    message = str(error.value)
    assert "yuvalkirstain/PickScore_v1" in message and "--reward_option pickscore.model=PATH" in message


def test_reward_option_is_parsed_as_eval_parses_it(script, tmp_path, prompts):
    args = script.parse_args(
        ["--pretrained_model_name_or_path", "x", "--train_data_file", prompts, "--output_dir", str(tmp_path),
         "--report_to", "none", "--reward_option", f"pickscore.model={tmp_path}"]
    )  # fmt: skip
    assert args.reward_options == {"pickscore": {"model": str(tmp_path)}}
    with pytest.raises(ValueError, match="--reward_option 'model' must look like NAME.OPTION=VALUE"):
        script.parse_reward_options(["model"])
    # A local path that does not exist is named before anything loads (never given `hf download` advice).
    with pytest.raises(ValueError, match="--reward_option pickscore.model=/ckpt/ps: no such file or folder"):
        script.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_file", prompts, "--output_dir",
                           str(tmp_path), "--reward_option", "pickscore.model=/ckpt/ps"])  # fmt: skip


def test_prompt_data_errors(tmp_path):
    import datasets

    binary = tmp_path / "prompts.txt"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="is not UTF-8 text \\(a NUL byte at byte 0\\)"):
        load_prompts(train_data_file=binary)
    with pytest.raises(ValueError, match="--dataset_name 'someone/prompts': not in the local Hugging Face cache"):
        load_prompts(dataset_name="someone/prompts")
    with pytest.raises(ValueError, match="no such folder \\(a local path, not a Hub id\\)"):
        load_prompts(dataset_name=str(tmp_path / "missing"))
    datasets.Dataset.from_dict({"prompt": ["a cat", "a dog"]}).save_to_disk(str(tmp_path / "saved"))
    assert load_prompts(dataset_name=str(tmp_path / "saved")) == ["a cat", "a dog"]
    assert load_prompts(train_data_file=tmp_path / "saved") == ["a cat", "a dog"]


def test_model_card_tells_the_truth(tmp_path):
    common = {"hyperparameters": {"divergence": "pseudo_huber", "huber_c": 1.0, "cfg_mode": "inner"}, "lora": True}
    write_model_card(str(tmp_path), "stabilityai/stable-diffusion-xl-base-1.0", "tianweiy/DMD2", "pickscore", **common)
    card = (tmp_path / "README.md").read_text()
    metadata = card.split("---")[1]
    assert "- stabilityai/stable-diffusion-xl-base-1.0\n- tianweiy/DMD2" in metadata
    assert "license: openrail++" in metadata
    assert "maximise the reward `pickscore`" in card and "load_lora_weights" in card and "pseudo_huber" in card

    local = str(tmp_path / "sdxl")
    os.makedirs(local)
    write_model_card(str(tmp_path), local, None, None, **common)
    card = (tmp_path / "README.md").read_text()
    assert "base_model" not in card.split("---")[1] and "without a reward" in card and "reward model" not in card
    assert card.count(f"from `{local}`") == 1


def test_validation_images_go_to_tensorboard(script, tmp_path):
    from PIL import Image

    paths = []
    for i, colour in enumerate(((255, 0, 0), (0, 0, 255))):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (8, 4), colour).save(paths[-1])
    logged = []
    writer = argparse.Namespace(add_images=lambda *a, **k: logged.append((a, k)))
    script.log_validation_images([argparse.Namespace(name="tensorboard", writer=writer)], paths, ["a", "b"], 7)
    (tag, batch, step), kwargs = logged[0]
    assert (tag, batch.shape, step, kwargs) == ("validation", (2, 4, 8, 3), 7, {"dataformats": "NHWC"})
    assert batch[0, 0, 0].tolist() == [255, 0, 0] and batch[1, 0, 0].tolist() == [0, 0, 255]


class OneProcess:
    is_main_process, num_processes, process_index = True, 1, 0

    def wait_for_everyone(self):
        pass


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    def write(folder):
        with open(os.path.join(folder, "state.bin"), "wb") as f:
            f.write(b"x" * 10)

    settings = {"use_lora": True}
    checkpointing.save_checkpoint(OneProcess(), str(tmp_path), 1, write, settings, total_limit=1)

    def fails(folder):
        write(folder)
        raise PermissionError(13, "Permission denied", os.path.join(folder, "state.bin"))

    # A write that raises: one error naming the file, what was written is removed, checkpoint-1 stays the newest.
    with pytest.raises(checkpointing.CheckpointWriteError) as failed:
        checkpointing.save_checkpoint(OneProcess(), str(tmp_path), 2, fails, settings, total_limit=1)
    assert str(failed.value).startswith(
        f"checkpoint-2 was not written (PermissionError: [Errno 13] Permission denied: "
        f"'{tmp_path / 'checkpoint-2.tmp' / 'state.bin'}'); the newest complete checkpoint is unchanged"
    )
    assert not failed.value.disk_full and os.listdir(tmp_path) == ["checkpoint-1"]

    def killed(folder):  # the process dies mid-save: no handler runs
        write(folder)
        raise SystemExit("killed")

    with pytest.raises(SystemExit):
        checkpointing.save_checkpoint(OneProcess(), str(tmp_path), 2, killed, settings, total_limit=1)
    assert checkpointing.checkpoint_dirs(str(tmp_path)) == ["checkpoint-1"]
    assert checkpointing.incomplete_dirs(str(tmp_path)) == ["checkpoint-2.tmp"]
    with pytest.raises(ValueError, match="half-written.*previous intact checkpoint is checkpoint-1"):
        checkpointing.resolve_resume(OneProcess(), str(tmp_path), str(tmp_path / "checkpoint-2.tmp"), settings)
    checkpointing.save_checkpoint(OneProcess(), str(tmp_path), 3, write, settings, total_limit=1)
    assert os.listdir(tmp_path) == ["checkpoint-3"]


def test_a_failed_role_write_is_raised_after_the_other_roles_gather(tmp_path):
    """The checkpoint hook on the main process: when writing generator/ fails, the assistant's gather (which the other
    ranks are in, under FSDP) still runs before the error is raised, so no rank waits in it forever."""
    from types import SimpleNamespace

    from diffusers_di_star.training.engine import register_checkpoint_hooks

    hooks, gathered = [], []
    accelerator = SimpleNamespace(
        is_main_process=True, register_save_state_pre_hook=hooks.append, register_load_state_pre_hook=hooks.append
    )
    networks = SimpleNamespace(use_lora=True, lora_state_dict=lambda role: gathered.append(role) or ({}, {}))

    def disk_full(folder, state_dict, metadata):
        raise OSError(errno.ENOSPC, "No space left on device", folder)

    register_checkpoint_hooks(accelerator, networks, SimpleNamespace(save_lora_weights=disk_full))
    weights = ["prepared unit"]
    with pytest.raises(OSError, match="No space left on device: .*generator"):
        hooks[0]([], weights, str(tmp_path))
    assert gathered == ["generator", "assistant"] and weights == []
