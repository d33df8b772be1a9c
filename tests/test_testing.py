"""The tiny offline SDXL is deterministic and has the real SDXL layout."""

import json

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from diffusers_di_star.testing import get_tiny_sdxl_components, get_tiny_tokenizer


def test_tokenizer_is_deterministic_clip_bpe(tmp_path):
    tokenizer = get_tiny_tokenizer()
    assert tokenizer.backend_tokenizer.to_str() == get_tiny_tokenizer().backend_tokenizer.to_str()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("A photo of an astronaut, zebra!").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "an</w>", "astronaut</w>", ",</w>",
                      "z", "e", "br", "a</w>", "!</w>", "<|endoftext|>"]
    assert tokenizer.model_max_length == 77 and get_tiny_tokenizer(pad_token="!").pad_token == "!"
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded("ünïcode 🙂").input_ids == tokenizer("ünïcode 🙂").input_ids
    assert tokenizer.unk_token_id not in tokenizer("ünïcode 🙂").input_ids[1:-1]  # every byte is covered


def test_components_are_seeded():
    a, b, c = get_tiny_sdxl_components(0), get_tiny_sdxl_components(0), get_tiny_sdxl_components(1)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for (key, pa), pb in zip(a[name].state_dict().items(), b[name].state_dict().values(), strict=True):
            assert torch.equal(pa, pb), (name, key)
    assert not torch.equal(a["unet"].conv_in.weight, c["unet"].conv_in.weight)


def test_sdxl_layout(tiny_sdxl_dir):
    model_index = json.load(open(f"{tiny_sdxl_dir}/model_index.json"))
    assert model_index["_class_name"] == "StableDiffusionXLPipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 4
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    prompt_embeds, _, pooled, _ = pipe.encode_prompt("a cat", do_classifier_free_guidance=False)
    assert prompt_embeds.shape == (1, 77, 96) and pooled.shape == (1, 64)
