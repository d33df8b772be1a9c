"""Resume checks: one table decides what may change; the manifest is checked against the files; no RNG pickle runs."""

import json
import os
import re
import shutil

import pytest
import torch
from test_run_folder import fresh_accelerate_and_stub_reward, script  # noqa: F401  (fixtures)
from test_training_script import LORA, copy_run, lora_run, prompt_file, run, train_args  # noqa: F401

from diffusers_di_star.training.resume import RESUME_POLICY, ResumeError, compare_settings, resume_settings

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "training.md")


def settings(trainer, tmp_path, model, *extra):
    args = trainer.parse_args(train_args(model, "p.txt", tmp_path / "o", *extra))
    trainer.check_args(args)
    trainer.resolve_family_defaults(args)  # t* and LoRA targets, as the trainer resolves them before comparing
    return json.loads(json.dumps(resume_settings(args)))


def test_the_table_decides_each_flag(script, tiny_sdxl_dir, tmp_path):  # noqa: F811  (fixture)
    saved = settings(script, tmp_path, tiny_sdxl_dir, *LORA, "--max_train_steps", "4")
    refused = {
        ("--conditioning_timestep", "500"): "--conditioning_timestep: checkpoint-2 was trained with 399, this run",
        ("--learning_rate", "1e-3"): "--learning_rate: checkpoint-2 was trained with 0.01",
        ("--max_train_steps", "1"): "--max_train_steps 1: checkpoint-2 is already at step 2",
    }
    for (flag, value), message in refused.items():
        given = settings(script, tmp_path, tiny_sdxl_dir, *LORA, "--max_train_steps", "4", flag, value)
        with pytest.raises(ResumeError, match=re.escape(message)):
            compare_settings(saved, given, "out/checkpoint-2", 2)
    extra = ["--guidance_scale", "5", "--huber_c", "0.5", "--cfg_reward_scale", "2", "--max_train_steps", "8"]
    notes = compare_settings(saved, settings(script, tmp_path, tiny_sdxl_dir, *LORA, *extra), "out/checkpoint-2", 2)
    assert notes == [
        "--guidance_scale changes from 7.5 to 5.0 at step 2 (the model card states 5.0)",
        "--cfg_reward_scale changes from 1.0 to 2.0 at step 2 (the model card states 2.0)",
        "--huber_c changes from 1.0 to 0.5 at step 2 (the model card states 0.5)",
        "--max_train_steps changes from 4 to 8",
    ]
    # The same model by a symlink: the real path matches. A copy (moved folder, other mount): the configs match.
    os.symlink(tiny_sdxl_dir, tmp_path / "link")
    given = settings(script, tmp_path, str(tmp_path / "link"), *LORA, "--max_train_steps", "4")
    assert compare_settings(saved, given, "c", 2) == []
    shutil.copytree(tiny_sdxl_dir, tmp_path / "copy")
    given = settings(script, tmp_path, str(tmp_path / "copy"), *LORA, "--max_train_steps", "4")
    [note] = compare_settings(saved, given, "c", 2)
    assert "(the same config files; weights are not compared)" in note
    config = tmp_path / "copy" / "unet" / "config.json"
    config.write_text(config.read_text().replace('"sample_size": ', '"sample_size": 1'))
    given = settings(script, tmp_path, str(tmp_path / "copy"), *LORA, "--max_train_steps", "4")
    with pytest.raises(ResumeError, match="their configs differ.*pass --allow_model_change if it is the same model"):
        compare_settings(saved, given, "c", 2)
    assert "--allow_model_change" in compare_settings(saved, given, "c", 2, allow_model_change=True)[0]


def test_docs_state_the_table():
    text = open(DOCS, encoding="utf-8").read()
    for flag, kind in RESUME_POLICY.items():
        row = re.search(rf"^ *\| ([a-z ]+) \|[^\n]*`--{flag}`", text, re.MULTILINE)
        assert row and row.group(1) == {"match": "must match", "note": "may change", "model": "same model",
                                        "bound": "bounded"}[kind], flag  # fmt: skip


def test_resume_with_a_noted_change_through_a_symlink_trains_on(
    script, tiny_sdxl_dir, prompt_file, lora_run, tmp_path, caplog  # noqa: F811  (fixtures)
):
    out = copy_run(lora_run, tmp_path)
    os.symlink(tiny_sdxl_dir, tmp_path / "model")
    extra = ["--use_ema", "--guidance_scale", "5", "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    assert run(script, *train_args(str(tmp_path / "model"), prompt_file, out, *LORA, *extra)) == 0
    assert "--guidance_scale changes from 7.5 to 5.0 at step 2" in caplog.text
    assert os.path.isdir(out / "checkpoint-3")


def test_a_hand_edited_manifest_and_a_code_carrying_rng_file_are_refused(
    script, tiny_sdxl_dir, prompt_file, lora_run, tmp_path, recwarn  # noqa: F811
):
    out = copy_run(lora_run, tmp_path)
    args = train_args(tiny_sdxl_dir, prompt_file, out, *LORA, "--use_ema", "--resume_from_checkpoint", "latest")
    path = out / "checkpoint-2" / "di_star_checkpoint.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "step": 999}))
    with pytest.raises(ValueError, match=r"is damaged \(step 999 in a folder named checkpoint-2\).*checkpoint-1"):
        run(script, *args)
    shapes = json.loads(json.dumps(manifest["shapes"]))
    name = next(iter(shapes))
    first = next(iter(shapes[name]))
    shapes[name][first] = [1, 2, 3]
    path.write_text(json.dumps({**manifest, "shapes": shapes}))
    with pytest.raises(ValueError, match=f"the tensor shapes of {name} differ from the file's"):
        run(script, *args)
    path.write_text(json.dumps(manifest))

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    rng = out / "checkpoint-2" / "random_states_0.pkl"
    torch.save({"random_state": Payload()}, rng, pickle_protocol=4)
    manifest["files"]["random_states_0.pkl"] = rng.stat().st_size
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"{rng} holds Python objects.*could run code.*checkpoint-1"):
        run(script, *args)
    assert not marker.exists()
    assert not [w for w in recwarn if "Detected pickle protocol" in str(w.message)]
