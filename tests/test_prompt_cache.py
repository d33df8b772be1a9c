"""Precomputed prompt embeddings (``training/prompt_cache.py``): lookups equal the family's own encoding (SDXL, SD3
with T5), a tensor shared by every prompt is stored once, the saved file is reused only under the same key."""

import os

import pytest
import torch

from diffusers_di_star.families import SD3Family, SDXLFamily
from diffusers_di_star.one_step import FlowSchedule, VPSchedule
from diffusers_di_star.testing import TINY_PROMPTS, get_tiny_sd3_components, get_tiny_sdxl_components
from diffusers_di_star.training.prompt_cache import PromptEmbeddingCache

pytestmark = pytest.mark.usefixtures("one_thread")


def _sdxl():
    c = get_tiny_sdxl_components()
    tokenizers, encoders = [c["tokenizer"], c["tokenizer_2"]], [c["text_encoder"], c["text_encoder_2"]]
    return SDXLFamily(VPSchedule.from_scheduler(c["scheduler"]), tokenizers, encoders, c["scheduler"])


def _sd3():
    c = get_tiny_sd3_components()
    names = ("", "_2", "_3")
    tokenizers, encoders = [c[f"tokenizer{n}"] for n in names], [c[f"text_encoder{n}"] for n in names]
    return SD3Family(FlowSchedule(), tokenizers, encoders, c["scheduler"], joint_attention_dim=96)


@pytest.mark.parametrize("make_family", [_sdxl, _sd3])
def test_lookup_equals_the_family_encoding_and_the_file_is_reused_only_under_its_key(make_family, tmp_path):
    family, prompts, path = make_family(), [*TINY_PROMPTS, TINY_PROMPTS[0]], str(tmp_path / "embeddings.safetensors")
    cache = PromptEmbeddingCache.load_or_build(path, family, prompts, 64, "model")
    assert len(cache.index) == len(TINY_PROMPTS) and os.path.isfile(path)
    batch = [TINY_PROMPTS[3], TINY_PROMPTS[0], TINY_PROMPTS[3]]
    expected, actual = family.encode(batch, 64), cache.encode(batch, 64)
    assert type(actual) is type(expected)
    for name, value in vars(expected).items():
        torch.testing.assert_close(getattr(actual, name), value, rtol=0, atol=1e-5)  # batch composition only
    # ∅ (SD3) and add_time_ids (SDXL) are the same for every prompt: one row on disk.
    shared = "negative_prompt_embeds" if family.name == "sd3" else "time_ids"
    assert cache.rows[shared].shape[0] == 1 and cache.rows["prompt_embeds"].shape[0] == len(TINY_PROMPTS)

    mtime = os.stat(path).st_mtime_ns
    reused = PromptEmbeddingCache.load_or_build(path, family, prompts, 64, "model")
    assert os.stat(path).st_mtime_ns == mtime and reused.index == cache.index
    torch.testing.assert_close(reused.encode(batch, 64).prompt_embeds, actual.prompt_embeds, rtol=0, atol=0)
    key = PromptEmbeddingCache.make_key("model", family, 64, prompts)
    assert PromptEmbeddingCache.load(path, type(actual), {**key, "resolution": 128}) is None
    assert (
        PromptEmbeddingCache.load(path, type(actual), PromptEmbeddingCache.make_key("other", family, 64, prompts))
        is None
    )
    with pytest.raises(KeyError, match="'a dog' is not in the precomputed"):
        cache.encode(["a dog"], 64)
    with pytest.raises(ValueError, match="resolution 64, not 128"):
        cache.encode(batch, 128)
