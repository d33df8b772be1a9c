"""HPSv2 and ImageReward run on converted weights: checked against forwards written here from the original
architectures (open_clip's ``CLIP``; BLIP's timm ViT and ``med.py`` BERT), which read the original state dicts
directly and share no code with the conversions or with transformers' models.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer, CLIPConfig

from diffusers_di_star.rewards import (
    HPSv2Reward,
    ImageReward,
    LetterboxImageTransform,
    convert_open_clip_state_dict,
    load_reward,
)
from diffusers_di_star.rewards.hpsv2 import HPS_CHECKPOINTS
from diffusers_di_star.rewards.preprocessing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipImageTransform
from diffusers_di_star.rewards.testing import (
    save_tiny_bert_tokenizer,
    save_tiny_clip,
    save_tiny_hps,
    save_tiny_image_reward,
)
from diffusers_di_star.weights import load_state_dict_file

PROMPTS = ["an oil painting of a lighthouse at sunset, dramatic clouds", "a bowl of ramen"]


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 240, 200, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------- open_clip / HPS


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    """A tiny laion/CLIP-ViT-H-14 folder (config + tokenizer; patch 14 like ViT-H/14) and an xswu/HPSv2 folder."""
    laion = save_tiny_clip(tmp_path_factory.mktemp("tiny-laion"), seed=1, patch_size=14)
    hps = tmp_path_factory.mktemp("tiny-hps")
    save_tiny_hps(hps, CLIPConfig.from_pretrained(laion), version="2.0", seed=2)
    save_tiny_hps(hps, CLIPConfig.from_pretrained(laion), version="2.1", seed=3)
    return laion, hps


def open_clip_blocks(x, state_dict, prefix, heads, causal):
    """open_clip ``Transformer``: pre-LN residual blocks of ``nn.MultiheadAttention`` and a GELU MLP."""
    width = x.shape[-1]
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1) if causal else None
    index = 0
    while f"{prefix}transformer.resblocks.{index}.ln_1.weight" in state_dict:
        name = f"{prefix}transformer.resblocks.{index}."
        block = {key.removeprefix(name): value for key, value in state_dict.items() if key.startswith(name)}
        attention = nn.MultiheadAttention(width, heads, batch_first=True)
        attention.load_state_dict({k.removeprefix("attn."): v for k, v in block.items() if k.startswith("attn.")})
        y = F.layer_norm(x, (width,), block["ln_1.weight"], block["ln_1.bias"])
        x = x + attention(y, y, y, need_weights=False, attn_mask=mask)[0]
        y = F.layer_norm(x, (width,), block["ln_2.weight"], block["ln_2.bias"])
        y = F.gelu(F.linear(y, block["mlp.c_fc.weight"], block["mlp.c_fc.bias"]))
        x = x + F.linear(y, block["mlp.c_proj.weight"], block["mlp.c_proj.bias"])
        index += 1
    return x


def open_clip_encode_image(state_dict, pixel_values, heads):
    """open_clip ``VisionTransformer.forward``: patchify, class token, ln_pre, blocks, ln_post, token 0, @ proj."""
    sd = {k.removeprefix("visual."): v for k, v in state_dict.items() if k.startswith("visual.")}
    x = F.conv2d(pixel_values, sd["conv1.weight"], stride=sd["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + sd["positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["ln_pre.weight"], sd["ln_pre.bias"])
    x = open_clip_blocks(x, state_dict, "visual.", heads, causal=False)
    x = F.layer_norm(x, x.shape[-1:], sd["ln_post.weight"], sd["ln_post.bias"])
    return F.normalize(x[:, 0] @ sd["proj"], dim=-1)


def open_clip_encode_text(state_dict, text, heads):
    """open_clip ``CLIP.encode_text``: causal blocks, ln_final, features at argmax(token id), @ text_projection."""
    x = state_dict["token_embedding.weight"][text] + state_dict["positional_embedding"]
    x = open_clip_blocks(x, state_dict, "", heads, causal=True)
    x = F.layer_norm(x, x.shape[-1:], state_dict["ln_final.weight"], state_dict["ln_final.bias"])
    return F.normalize(x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ state_dict["text_projection"], dim=-1)


def open_clip_tokenize(tokenizer, prompts, context_length=77):
    """open_clip's tokenizer output: start, tokens, end, zero padding to the context length."""
    tokens = torch.zeros(len(prompts), context_length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt).input_ids
        tokens[row, : len(ids)] = torch.tensor(ids)
    return tokens


def hpsv2_preprocess(images, size=224):
    """hpsv2 1.2.0's ``preprocess_val`` (``light_augmentation=True``: ``ToTensor``, ``ResizeMaxSize(224)``, normalise),
    written with PIL and NumPy: the longest side to ``size`` by ``round(dim * size / longest)``, bicubic (PIL's
    antialiased ``a = -0.5`` filter, the one torch's antialiased bicubic implements) on float pixels (mode "F": no
    uint8 rounding, no clipping), then ``F.pad`` with 0 by ``pad // 2`` on the top/left, the rest on the bottom/right.
    """
    out = []
    for image in images.numpy().astype(np.float32):
        height, width = image.shape[1:]
        scale = size / float(max(height, width))
        new_height, new_width = round(height * scale), round(width * scale)
        channels = [Image.fromarray(c, mode="F").resize((new_width, new_height), Image.BICUBIC) for c in image]
        pad_h, pad_w = size - new_height, size - new_width
        padding = ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
        out.append(np.pad(np.stack([np.asarray(channel) for channel in channels]), padding))
    mean, std = np.array(OPENAI_CLIP_MEAN)[:, None, None], np.array(OPENAI_CLIP_STD)[:, None, None]
    return torch.from_numpy(((np.stack(out) - mean) / std).astype(np.float32))


def checkerboard(height, width, cell):
    """Hard 0/1 edges: bicubic overshoots them, below 0 and above 1."""
    rows, cols = np.indices((height, width)) // cell
    return torch.from_numpy(((rows + cols) % 2).astype(np.float32)).expand(1, 3, height, width).contiguous()


@pytest.mark.parametrize(
    ("height", "width"), [(240, 200), (200, 240), (1000, 333), (57, 91), (225, 224), (512, 512), (224, 224)]
)
def test_hps_preprocessing_is_hpsv2_letterbox(height, width):
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(height + width))
    actual = LetterboxImageTransform(224)(images)
    expected = hpsv2_preprocess(images)
    assert actual.shape == expected.shape == (2, 3, 224, 224)
    # Float arithmetic on both sides: PIL's float resize and torch's agree to ~0.005/255; the bound is 1/100 of 1/255.
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    assert ((actual - expected) * std).abs().max() <= 0.01 / 255
    if height != width:  # black (0 before normalisation) bars on the short side
        pad = (224 - round(min(height, width) * 224 / max(height, width))) // 2
        bar = actual[..., :pad, :] if height < width else actual[..., :, :pad]
        torch.testing.assert_close(bar * std, -torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1).expand_as(bar))


def test_hps_preprocessing_does_not_clip_the_bicubic_overshoot():
    images = checkerboard(512, 512, cell=7)  # square: resized, not padded
    actual, expected = LetterboxImageTransform(224)(images), hpsv2_preprocess(images)
    std, mean = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    pixels = expected * std + mean
    assert pixels.min() < -0.02 and pixels.max() > 1.02  # what the old clamp after each pass cut off
    assert ((actual - expected) * std).abs().max() <= 0.01 / 255


def test_hps_preprocessing_is_differentiable():
    images = torch.rand(2, 3, 96, 64, requires_grad=True)
    out = LetterboxImageTransform(32)(images)
    assert out.shape == (2, 3, 32, 32)
    out[:, :, :, 16].sum().backward()  # one column: reaches only the pixels that feed it
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_hps_score_of_a_non_square_image_changes_under_the_old_centre_crop(hps_files, images):
    laion, hps = hps_files
    reward = HPSv2Reward.from_pretrained(checkpoint=hps, processor=laion)
    heads = reward.clip.config.vision_config.num_attention_heads
    state_dict = load_state_dict_file(hps / HPS_CHECKPOINTS["2.1"])
    with torch.no_grad():
        text = open_clip_encode_text(state_dict, open_clip_tokenize(reward.tokenizer, PROMPTS), heads)
        letterbox = 100 * (open_clip_encode_image(state_dict, hpsv2_preprocess(images), heads) * text).sum(-1)
        cropped = ClipImageTransform.torchvision(224)(images)  # the shortest side to 224, a 268x224 centre crop
        crop = 100 * (open_clip_encode_image(state_dict, cropped, heads) * text).sum(-1)
    scores = reward(images, PROMPTS)
    torch.testing.assert_close(scores, letterbox, atol=2e-3, rtol=1e-4)
    assert (scores - crop).abs().min() > 0.25  # 1.08 and 0.37 here


@pytest.mark.parametrize(("name", "version"), [("hpsv2", "2.0"), ("hpsv2.1", "2.1")])
def test_hps_matches_open_clip_on_the_original_state_dict(hps_files, images, name, version):
    laion, hps = hps_files
    reward = load_reward(name, **{name: {"checkpoint": hps, "processor": laion}}).rewards[0]
    heads = CLIPConfig.from_pretrained(laion).vision_config.num_attention_heads
    state_dict = load_state_dict_file(hps / HPS_CHECKPOINTS[version])
    pixel_values = hpsv2_preprocess(images)  # 240x200: letterboxed to 224x187 + 37 columns of padding
    with torch.no_grad():
        image_embeds = open_clip_encode_image(state_dict, pixel_values, heads)
        text_embeds = open_clip_encode_text(state_dict, open_clip_tokenize(reward.tokenizer, PROMPTS), heads)
    torch.testing.assert_close(reward.embed_images(images).detach(), image_embeds, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(reward.embed_prompts(PROMPTS), text_embeds, atol=2e-5, rtol=1e-4)
    expected = 100 * (image_embeds * text_embeds).sum(-1)
    torch.testing.assert_close(reward(images, PROMPTS).detach(), expected, atol=2e-3, rtol=1e-4)
    assert expected.abs().min() > 1  # not two near-zero numbers
    images = images.clone().requires_grad_(True)
    reward(images, PROMPTS).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_hps_versions_are_different_checkpoints(hps_files, images):
    laion, hps = hps_files
    v2 = HPSv2Reward.from_pretrained(version="2.0", checkpoint=hps, processor=laion)
    v21 = HPSv2Reward.from_pretrained(version="2.1", checkpoint=hps, processor=laion)
    assert not torch.allclose(v2(images, PROMPTS), v21(images, PROMPTS))


def test_hps_loads_a_file_path_and_safetensors(hps_files, images, tmp_path):
    laion, hps = hps_files
    expected = HPSv2Reward.from_pretrained(checkpoint=hps, processor=laion)(images, PROMPTS)
    path = hps / "HPS_v2.1_compressed.pt"
    save_file(load_state_dict_file(path), tmp_path / "hps.safetensors")
    for checkpoint in (path, tmp_path / "hps.safetensors"):
        reward = HPSv2Reward.from_pretrained(checkpoint=checkpoint, processor=laion)
        torch.testing.assert_close(reward(images, PROMPTS), expected)


def test_wrong_attention_layout_is_caught_by_the_reference(hps_files, images):
    """The comparison is sensitive: swapping the q and k rows of one fused projection changes the embeddings."""
    laion, hps = hps_files
    state_dict = load_state_dict_file(hps / "HPS_v2.1_compressed.pt")
    name = "visual.transformer.resblocks.0.attn.in_proj_weight"
    q, k, v = state_dict[name].chunk(3)
    swapped = {**state_dict, name: torch.cat([k, q, v])}
    reward = HPSv2Reward.from_pretrained(checkpoint=hps, processor=laion)
    heads = reward.clip.config.vision_config.num_attention_heads
    pixel_values = reward.transform(images)
    with torch.no_grad():
        difference = open_clip_encode_image(swapped, pixel_values, heads) - reward.embed_images(images)
    assert difference.abs().max() > 1e-2


def test_open_clip_conversion_layout():
    state_dict = {
        "visual.transformer.resblocks.3.attn.in_proj_weight": torch.arange(12.0).view(6, 2),
        "visual.proj": torch.arange(6.0).view(2, 3),
        "transformer.resblocks.0.mlp.c_fc.bias": torch.ones(4),
    }
    converted = convert_open_clip_state_dict(state_dict)
    layer = "vision_model.encoder.layers.3.self_attn."
    assert sorted(converted) == sorted(
        [f"{layer}q_proj.weight", f"{layer}k_proj.weight", f"{layer}v_proj.weight", "visual_projection.weight"]
        + ["text_model.encoder.layers.0.mlp.fc1.bias"]
    )
    torch.testing.assert_close(converted[f"{layer}k_proj.weight"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    torch.testing.assert_close(converted["visual_projection.weight"], torch.arange(6.0).view(2, 3).t())


def test_open_clip_conversion_refuses_unknown_weights():
    with pytest.raises(
        ValueError, match=r"Unsupported open_clip weights \['visual.transformer.resblocks.0.ls_1.gamma'"
    ):
        convert_open_clip_state_dict({"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(2)})


def test_hps_refuses_a_quick_gelu_config(hps_files, tmp_path):
    laion, hps = hps_files
    config = json.loads(open(f"{laion}/config.json").read())
    config["vision_config"]["hidden_act"] = "quick_gelu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GELU.*quick_gelu"):
        HPSv2Reward.from_pretrained(checkpoint=hps, processor=tmp_path)
    with pytest.raises(ValueError, match=r"Unknown HPS version '3'.*\['2.0', '2.1'\]"):
        HPSv2Reward.from_pretrained(version="3", checkpoint=hps, processor=laion)


def test_checkpoint_that_does_not_fit_the_config_is_refused(hps_files, tmp_path):
    laion, hps = hps_files
    state_dict = load_state_dict_file(hps / "HPS_v2.1_compressed.pt")
    del state_dict["ln_final.bias"]
    torch.save({"state_dict": state_dict}, tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(ValueError, match=r"does not fit CLIPModel: missing \['text_model.final_layer_norm.bias'\]"):
        HPSv2Reward.from_pretrained(checkpoint=tmp_path, processor=laion)


# ----------------------------------------------------------------------------------------------- ImageReward


@pytest.fixture(scope="module")
def image_reward_files(tmp_path_factory):
    """A tiny THUDM/ImageReward folder (ImageReward.pt + med_config.json) and a bert-base-uncased-layout tokenizer."""
    tokenizer = save_tiny_bert_tokenizer(tmp_path_factory.mktemp("tiny-bert"))
    model = save_tiny_image_reward(
        tmp_path_factory.mktemp("tiny-image-reward"), len(AutoTokenizer.from_pretrained(tokenizer))
    )
    return model, tokenizer


def attention(query, key, value, heads, mask=None):
    batch, length, width = query.shape
    q, k, v = (t.view(batch, -1, heads, width // heads).transpose(1, 2) for t in (query, key, value))
    scores = q @ k.transpose(-1, -2) / (width // heads) ** 0.5
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)


def blip_vit(sd, pixel_values, heads):
    """BLIP's timm-style ``VisionTransformer.forward`` on ``blip.visual_encoder.*`` weights (LayerNorm eps 1e-6)."""
    sd = {k.removeprefix("blip.visual_encoder."): v for k, v in sd.items() if k.startswith("blip.visual_encoder.")}
    weight = sd["patch_embed.proj.weight"]
    x = F.conv2d(pixel_values, weight, sd["patch_embed.proj.bias"], stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    width, index = x.shape[-1], 0
    while f"blocks.{index}.norm1.weight" in sd:
        block = f"blocks.{index}."
        y = F.layer_norm(x, (width,), sd[f"{block}norm1.weight"], sd[f"{block}norm1.bias"], eps=1e-6)
        q, k, v = F.linear(y, sd[f"{block}attn.qkv.weight"], sd[f"{block}attn.qkv.bias"]).chunk(3, dim=-1)
        x = x + F.linear(attention(q, k, v, heads), sd[f"{block}attn.proj.weight"], sd[f"{block}attn.proj.bias"])
        y = F.layer_norm(x, (width,), sd[f"{block}norm2.weight"], sd[f"{block}norm2.bias"], eps=1e-6)
        y = F.gelu(F.linear(y, sd[f"{block}mlp.fc1.weight"], sd[f"{block}mlp.fc1.bias"]))
        x = x + F.linear(y, sd[f"{block}mlp.fc2.weight"], sd[f"{block}mlp.fc2.bias"])
        index += 1
    return F.layer_norm(x, (width,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


def blip_bert(sd, input_ids, attention_mask, image_states, heads, eps):
    """BLIP ``med.py`` ``BertModel`` in multimodal mode: self-attention, cross-attention to the image, feed-forward."""
    sd = {k.removeprefix("blip.text_encoder."): v for k, v in sd.items() if k.startswith("blip.text_encoder.")}

    def dense(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def add_norm(x, residual, name):  # BertSelfOutput / BertOutput: LayerNorm(dense(x) + residual)
        weight, bias = sd[f"{name}.LayerNorm.weight"], sd[f"{name}.LayerNorm.bias"]
        return F.layer_norm(dense(x, f"{name}.dense") + residual, weight.shape, weight, bias, eps=eps)

    positions = torch.arange(input_ids.shape[1])
    x = sd["embeddings.word_embeddings.weight"][input_ids] + sd["embeddings.position_embeddings.weight"][positions]
    x = F.layer_norm(x, x.shape[-1:], sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"], eps=eps)
    padding = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    index = 0
    while f"encoder.layer.{index}.intermediate.dense.weight" in sd:
        layer = f"encoder.layer.{index}."
        for kind, states, mask in (("attention", x, padding), ("crossattention", image_states, None)):
            name = f"{layer}{kind}.self"
            context = attention(
                dense(x, f"{name}.query"), dense(states, f"{name}.key"), dense(states, f"{name}.value"), heads, mask
            )
            x = add_norm(context, x, f"{layer}{kind}.output")
        x = add_norm(F.gelu(dense(x, f"{layer}intermediate.dense")), x, f"{layer}output")
        index += 1
    return x


def test_image_reward_matches_blip_on_the_original_state_dict(image_reward_files, images):
    model, tokenizer = image_reward_files
    reward = load_reward("imagereward", imagereward={"model": model, "tokenizer": tokenizer}).rewards[0]
    sd = load_state_dict_file(f"{model}/ImageReward.pt")
    med_config = json.loads(open(f"{model}/med_config.json").read())
    vision_heads = sd["blip.visual_encoder.cls_token"].shape[-1] // 64
    tokens = AutoTokenizer.from_pretrained(tokenizer)(
        PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    with torch.no_grad():
        image_states = blip_vit(sd, reward.transform(images), vision_heads)
        text_states = blip_bert(
            sd,
            tokens.input_ids,
            tokens.attention_mask,
            image_states,
            med_config["num_attention_heads"],
            med_config["layer_norm_eps"],
        )
        features = text_states[:, 0]
        for index in (0, 2, 4, 6, 7):
            features = F.linear(features, sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"])
    expected = (features.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072  # ImageReward.py
    scores = reward(images, PROMPTS)
    torch.testing.assert_close(scores.detach(), expected, atol=1e-5, rtol=1e-4)
    assert (expected[0] - expected[1]).abs() > 1e-3  # the prompts matter
    images = images.clone().requires_grad_(True)
    reward(images, PROMPTS).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_image_reward_loads_from_the_checkpoint_file(image_reward_files, images):
    model, tokenizer = image_reward_files
    expected = ImageReward.from_pretrained(model, tokenizer=tokenizer)(images, PROMPTS)
    reward = ImageReward.from_pretrained(f"{model}/ImageReward.pt", tokenizer=tokenizer)
    torch.testing.assert_close(reward(images, PROMPTS), expected)


def test_image_reward_refuses_unexpected_weights(image_reward_files, tmp_path):
    model, tokenizer = image_reward_files
    shutil.copy(f"{model}/med_config.json", tmp_path)
    sd = load_state_dict_file(f"{model}/ImageReward.pt")
    sd["blip.text_decoder.cls.predictions.bias"] = torch.zeros(3)
    torch.save(sd, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match=r"Unexpected weights in the ImageReward checkpoint: \['blip.text_decoder"):
        ImageReward.from_pretrained(tmp_path, tokenizer=tokenizer)
