"""A run folder has one owner, ``--overwrite_output_dir`` leaves only the new run, and the edges around a run."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from test_training_script import LORA, load_script, run, train_args
from training_helpers import PatternReward

from diffusers_di_star.evaluation import load_prompt_set
from diffusers_di_star.evaluation.prompts import PromptSetError
from diffusers_di_star.training.run_folder import (
    LOCK_NAME,
    RunFolderError,
    acquire_run_lock,
    check_process_group,
    clear_previous_run,
)


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(autouse=True)
def fresh_accelerate_and_stub_reward(script, monkeypatch):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(script, "load_reward", lambda spec: PatternReward().freeze())


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_a_second_owner_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, caplog):
    folder = str(tmp_path / "run")
    lock = acquire_run_lock(folder)
    owner = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname())
    # Another live process on this host owns the folder: refused, naming it and how to proceed.
    other = {"pid": os.getppid(), "host": socket.gethostname(), "started": "2026-12-05 01:00:00", "token": "x"}
    (tmp_path / "run" / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(RunFolderError) as refused:
        acquire_run_lock(folder)
    message = str(refused.value)
    assert f"is in use by another trainer (pid {os.getppid()} on {socket.gethostname()}" in message
    assert "pass another --output_dir" in message and "\n" not in message
    lock.release()  # not ours any more: the other owner's lock stays
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["token"] == "x"
    # Another host cannot be checked: refused too.
    (tmp_path / "run" / LOCK_NAME).write_text(json.dumps({**other, "host": "elsewhere"}))
    with pytest.raises(RunFolderError, match=f"if that run is dead on another machine, delete .*{LOCK_NAME}"):
        acquire_run_lock(folder)
    # Same host, process gone: taken over with a note.
    (tmp_path / "run" / LOCK_NAME).write_text(json.dumps({**other, "pid": dead_pid()}))
    lock = acquire_run_lock(folder)
    assert "is gone; taking it over" in caplog.text
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert os.listdir(folder) == []


def test_processes_that_did_not_form_a_group_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(RunFolderError, match="accelerate started 8 processes, but each runs alone"):
        check_process_group(1)
    check_process_group(8)
    monkeypatch.delenv("WORLD_SIZE")
    check_process_group(1)


def test_trainer_refuses_a_locked_folder_and_a_lone_process_of_a_group(script, tmp_path, tiny_sdxl_dir, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "t"}))
    args = train_args(tiny_sdxl_dir, str(prompts), out)
    assert script.cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train_di_star_sdxl.py: error: --output_dir") and "is in use by another" in err[-1]
    os.environ["WORLD_SIZE"] = "2"
    try:
        assert script.cli(args) == 2
    finally:
        del os.environ["WORLD_SIZE"]
    err = capsys.readouterr().err
    assert "accelerate started 2 processes" in err and "Distributed environment" not in err  # no state block first


def test_overwrite_removes_only_what_the_previous_run_wrote(script, tmp_path, tiny_sdxl_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "out"
    run(script, *train_args(tiny_sdxl_dir, str(prompts), out, *LORA, "--max_train_steps", "1",
                            "--validation_prompts", "a cat"))  # fmt: skip
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-7.tmp").mkdir()
    before = sorted(os.listdir(out))
    assert {"pytorch_lora_weights.safetensors", "README.md", "images", "checkpoint-1"} <= set(before)
    run(script, *train_args(tiny_sdxl_dir, str(prompts), out, "--max_train_steps", "1", "--overwrite_output_dir"))
    after = set(os.listdir(out))
    assert "pytorch_lora_weights.safetensors" not in after and "checkpoint-7.tmp" not in after
    assert {"model_index.json", "unet", "notes.txt", "checkpoint-1", "README.md"} <= after and LOCK_NAME not in after
    assert list((out / "images").iterdir()) == []  # no validation prompts this time: the old images are gone
    # What a run wrote, listed for removal; the user's file is not.
    (out / "logs").mkdir(exist_ok=True)
    removed = clear_previous_run(str(out), "logs")
    assert "notes.txt" not in removed and {"unet", "model_index.json", "README.md", "logs"} <= set(removed)
    assert sorted(os.listdir(out)) == ["notes.txt"]
    # A model folder no run of this trainer finished (no training_args.json) keeps everything but checkpoints.
    model = tmp_path / "downloaded-model"
    shutil.copytree(tiny_sdxl_dir, model)
    (model / "checkpoint-3").mkdir()
    before = sorted(os.listdir(model))
    assert clear_previous_run(str(model), "logs") == ["checkpoint-3"]
    assert sorted(os.listdir(model)) == [name for name in before if name != "checkpoint-3"]


def test_trainer_pixel_cap(script, tmp_path):
    with pytest.raises(ValueError, match="above the limit of 16,777,216"):
        script.parse_args(train_args("m", "p.txt", tmp_path / "o", "--resolution", "65536"))


def test_eval_reads_the_trainers_csv(tmp_path):
    (tmp_path / "p.csv").write_text('prompt,seed\n"a cat, sitting",1\na dog,2\n')
    assert [p.text for p in load_prompt_set(str(tmp_path / "p.csv")).prompts] == ["a cat, sitting", "a dog"]
    (tmp_path / "header.csv").write_text("prompt\n")
    (tmp_path / "other.csv").write_text("text\na\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for name, message in [
        ("header.csv", r"header.csv has a header but no prompts in its 'prompt' column"),
        ("other.csv", r"other.csv: a .csv prompt file needs a header row with a 'prompt' column"),
        ("latin1.txt", r"latin1.txt is not UTF-8 text \(invalid continuation byte at byte 3\)"),
    ]:
        with pytest.raises(PromptSetError, match=message):
            load_prompt_set(str(tmp_path / name))
