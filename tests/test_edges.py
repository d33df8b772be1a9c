"""The roots of the edge cases (one error base, one source resolver, one set of DI* defaults) and the edges."""

import os

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


def test_first_line_and_the_base_class():
    assert first_line(ValueError("\n  first\nsecond")) == "first" and first_line(KeyError()) == "KeyError"
    from diffusers_di_star.export import ExportError
    from diffusers_di_star.runtime import ModelLoadError
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
