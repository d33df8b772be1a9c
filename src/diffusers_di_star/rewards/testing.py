"""Tiny reward checkpoints in the published layouts, built offline: for tests, the demo and users' own tests.

Each ``save_tiny_*`` writes what the real checkpoint's Hub repo holds, in miniature and with random weights, so the
real loaders run on it unchanged:

==========================  ================================================  ===================================
reward                      published as                                      tiny stand-in
==========================  ================================================  ===================================
PickScore, CLIP score       a CLIPModel + CLIPProcessor folder                :func:`save_tiny_clip`
HPSv2 / v2.1                an open_clip state dict ``{"state_dict": ...}``   :func:`save_tiny_hps` (+ a CLIP
                            + laion/CLIP-ViT-H-14's config and tokenizer      folder for config and tokenizer)
LAION aesthetic             an MLP state dict ``.pth`` (+ CLIP ViT-L/14)      :func:`save_tiny_aesthetic`
ImageReward                 ``ImageReward.pt`` + ``med_config.json``          :func:`save_tiny_image_reward` and
                            (+ bert-base-uncased's tokenizer)                 :func:`save_tiny_bert_tokenizer`
==========================  ================================================  ===================================

Example::

    folder = save_tiny_clip("tiny-clip")
    reward = load_reward("pickscore", pickscore={"model": folder, "processor": folder})
"""

from __future__ import annotations

import json
import os
import re

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from ..testing import TINY_PROMPTS, get_tiny_tokenizer
from .aesthetic import AESTHETIC_FILENAME
from .hpsv2 import HPS_CHECKPOINTS
from .mlp_head import PreferenceMLP

__all__ = [
    "get_tiny_clip_config",
    "get_tiny_clip_tokenizer",
    "get_tiny_image_reward_state_dict",
    "get_tiny_open_clip_state_dict",
    "save_tiny_aesthetic",
    "save_tiny_bert_tokenizer",
    "save_tiny_clip",
    "save_tiny_hps",
    "save_tiny_image_reward",
]

_WIDTH, _LAYERS, _HEADS, _PROJECTION = 32, 2, 4, 16
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BLIP_VISION_WIDTH = 128


def get_tiny_clip_tokenizer() -> CLIPTokenizer:
    """The package's tiny CLIP BPE with CLIP's id layout: start- and end-of-text are the two largest ids.

    Real CLIP vocabularies end with ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407), and open_clip pools the
    text at ``argmax(token id)``, which is the end-of-text token only with that layout.
    """
    tokenizer = get_tiny_tokenizer()
    specials = [tokenizer.bos_token, tokenizer.eos_token]
    ordinary = [
        token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]) if token not in specials
    ]
    vocab = {token: index for index, token in enumerate(ordinary + specials)}
    merges = [tuple(pair) for pair in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=tokenizer.eos_token, model_max_length=77)


def get_tiny_clip_config(vocab_size: int, patch_size: int = 32) -> CLIPConfig:
    """A 2-layer, 32-wide CLIP for 224x224 images, GELU like OpenCLIP ViT-H/14 (end-of-text = the last id)."""
    tower = {"hidden_size": _WIDTH, "intermediate_size": 4 * _WIDTH, "num_hidden_layers": _LAYERS}
    tower |= {"num_attention_heads": _HEADS, "hidden_act": "gelu"}
    text_config = tower | {"vocab_size": vocab_size, "max_position_embeddings": 77}
    text_config |= {"bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1}
    vision_config = tower | {"image_size": 224, "patch_size": patch_size}
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=_PROJECTION)


def save_tiny_clip(path: str | os.PathLike, seed: int = 0, patch_size: int = 32) -> str:
    """A CLIPModel + CLIPProcessor folder, the layout of yuvalkirstain/PickScore_v1, openai/clip-vit-large-patch14
    and laion/CLIP-ViT-H-14-laion2B-s32B-b79K (whose image processor settings it shares). Returns the path."""
    tokenizer = get_tiny_clip_tokenizer()
    torch.manual_seed(seed)
    model = CLIPModel(get_tiny_clip_config(len(tokenizer), patch_size))
    model.save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(path)
    return os.fspath(path)


def get_tiny_open_clip_state_dict(config: CLIPConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights named and shaped as open_clip's ``CLIP`` (ViT image tower) state dict for ``config``."""
    generator = torch.Generator().manual_seed(seed)
    text, vision = config.text_config, config.vision_config
    grid = vision.image_size // vision.patch_size
    state_dict = {
        "token_embedding.weight": (text.vocab_size, text.hidden_size),
        "positional_embedding": (text.max_position_embeddings, text.hidden_size),
        "text_projection": (text.hidden_size, config.projection_dim),
        "visual.class_embedding": (vision.hidden_size,),
        "visual.positional_embedding": (grid * grid + 1, vision.hidden_size),
        "visual.conv1.weight": (vision.hidden_size, 3, vision.patch_size, vision.patch_size),
        "visual.proj": (vision.hidden_size, config.projection_dim),
    }
    state_dict = {name: _random(shape, generator) for name, shape in state_dict.items()}
    state_dict |= _layer_norm("ln_final", text.hidden_size, generator)
    state_dict |= _layer_norm("visual.ln_pre", vision.hidden_size, generator)
    state_dict |= _layer_norm("visual.ln_post", vision.hidden_size, generator)
    for prefix, tower in (("", text), ("visual.", vision)):
        width, hidden = tower.hidden_size, tower.intermediate_size
        for index in range(tower.num_hidden_layers):
            block = f"{prefix}transformer.resblocks.{index}."
            state_dict |= _layer_norm(f"{block}ln_1", width, generator) | _layer_norm(f"{block}ln_2", width, generator)
            state_dict[f"{block}attn.in_proj_weight"] = _random((3 * width, width), generator)
            state_dict[f"{block}attn.in_proj_bias"] = _random((3 * width,), generator, scale=0.1)
            state_dict |= _linear(f"{block}attn.out_proj", width, width, generator)
            state_dict |= _linear(f"{block}mlp.c_fc", hidden, width, generator)
            state_dict |= _linear(f"{block}mlp.c_proj", width, hidden, generator)
    state_dict["logit_scale"] = torch.tensor(4.6052)  # log(100), as trained CLIPs end up
    return state_dict


def save_tiny_hps(path: str | os.PathLike, config: CLIPConfig, version: str = "2.1", seed: int = 0) -> str:
    """``HPS_v2[.1]_compressed.pt`` in folder ``path`` (as in xswu/HPSv2): ``{"state_dict": open_clip weights}``."""
    os.makedirs(path, exist_ok=True)
    torch.save(
        {"state_dict": get_tiny_open_clip_state_dict(config, seed)}, os.path.join(path, HPS_CHECKPOINTS[version])
    )
    return os.fspath(path)


def save_tiny_aesthetic(path: str | os.PathLike, input_size: int = _PROJECTION, seed: int = 0) -> str:
    """``sac+logos+ava1-l14-linearMSE.pth`` in folder ``path``: the MLP head's plain state dict."""
    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    torch.save(PreferenceMLP(input_size).state_dict(), os.path.join(path, AESTHETIC_FILENAME))
    return os.fspath(path)


def save_tiny_bert_tokenizer(path: str | os.PathLike) -> str:
    """A WordPiece ``vocab.txt`` + ``tokenizer_config.json`` folder, bert-base-uncased's layout, over TINY_PROMPTS."""
    words = sorted({word for prompt in TINY_PROMPTS for word in re.findall(r"\w+|[^\w\s]", prompt.lower())})
    pieces = sorted({f"##{char}" for word in words for char in word} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as file:
        file.write(
            "\n".join(_BERT_SPECIALS + [token for token in words + pieces if token not in _BERT_SPECIALS]) + "\n"
        )
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as file:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}, file)
    return os.fspath(path)


def get_tiny_image_reward_state_dict(med_config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights named and shaped as ImageReward's checkpoint: a BLIP ViT for 224x224 images in 16-pixel
    patches, two 64-wide heads (BLIP's head width) and its BERT described by ``med_config``, and the MLP head."""
    generator = torch.Generator().manual_seed(seed)
    width, patch, image_size = _BLIP_VISION_WIDTH, 16, 224
    vit, bert = "blip.visual_encoder.", "blip.text_encoder."
    state_dict = {
        f"{vit}cls_token": _random((1, 1, width), generator),
        f"{vit}pos_embed": _random((1, (image_size // patch) ** 2 + 1, width), generator),
    }
    state_dict |= _linear(f"{vit}patch_embed.proj", width, 3 * patch * patch, generator)
    state_dict[f"{vit}patch_embed.proj.weight"] = state_dict[f"{vit}patch_embed.proj.weight"].view(
        width, 3, patch, patch
    )
    state_dict |= _layer_norm(f"{vit}norm", width, generator)
    for index in range(_LAYERS):
        block = f"{vit}blocks.{index}."
        state_dict |= _layer_norm(f"{block}norm1", width, generator) | _layer_norm(f"{block}norm2", width, generator)
        state_dict |= _linear(f"{block}attn.qkv", 3 * width, width, generator)
        state_dict |= _linear(f"{block}attn.proj", width, width, generator)
        state_dict |= _linear(f"{block}mlp.fc1", 4 * width, width, generator)
        state_dict |= _linear(f"{block}mlp.fc2", width, 4 * width, generator)
    hidden, inner, positions = (
        med_config["hidden_size"],
        med_config["intermediate_size"],
        med_config["max_position_embeddings"],
    )
    state_dict[f"{bert}embeddings.word_embeddings.weight"] = _random((med_config["vocab_size"], hidden), generator)
    state_dict[f"{bert}embeddings.position_embeddings.weight"] = _random((positions, hidden), generator)
    state_dict[f"{bert}embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    state_dict |= _layer_norm(f"{bert}embeddings.LayerNorm", hidden, generator)
    for index in range(med_config["num_hidden_layers"]):
        layer = f"{bert}encoder.layer.{index}."
        for attention, key_width in (("attention", hidden), ("crossattention", width)):
            state_dict |= _linear(f"{layer}{attention}.self.query", hidden, hidden, generator)
            state_dict |= _linear(f"{layer}{attention}.self.key", hidden, key_width, generator)
            state_dict |= _linear(f"{layer}{attention}.self.value", hidden, key_width, generator)
            state_dict |= _linear(f"{layer}{attention}.output.dense", hidden, hidden, generator)
            state_dict |= _layer_norm(f"{layer}{attention}.output.LayerNorm", hidden, generator)
        state_dict |= _linear(f"{layer}intermediate.dense", inner, hidden, generator)
        state_dict |= _linear(f"{layer}output.dense", hidden, inner, generator)
        state_dict |= _layer_norm(f"{layer}output.LayerNorm", hidden, generator)
    state_dict |= _linear("blip.vision_proj", 256, width, generator) | _linear(
        "blip.text_proj", 256, hidden, generator
    )
    torch.manual_seed(seed)
    state_dict |= {f"mlp.{name}": tensor for name, tensor in PreferenceMLP(hidden).state_dict().items()}
    return state_dict


def save_tiny_image_reward(path: str | os.PathLike, vocab_size: int, seed: int = 0) -> str:
    """``ImageReward.pt`` + ``med_config.json`` in folder ``path`` (as in THUDM/ImageReward), for a tokenizer of
    ``vocab_size`` tokens (BLIP adds two: ``[DEC]`` and ``[ENC]``)."""
    med_config = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": _WIDTH,
        "initializer_range": 0.02,
        "intermediate_size": 4 * _WIDTH,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": _HEADS,
        "num_hidden_layers": _LAYERS,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size + 2,
        "encoder_width": _WIDTH,  # BLIP replaces it with the image tower's width, as for the real 768 vs 1024
        "add_cross_attention": True,
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "med_config.json"), "w", encoding="utf-8") as file:
        json.dump(med_config, file, indent=2)
    torch.save(get_tiny_image_reward_state_dict(med_config, seed), os.path.join(path, "ImageReward.pt"))
    return os.fspath(path)


def _random(shape: tuple[int, ...], generator: torch.Generator, scale: float | None = None) -> torch.Tensor:
    # Unit-variance signals through every layer, so a wrong name or layout changes the outputs by O(1).
    scale = shape[-1] ** -0.5 if scale is None else scale
    return torch.randn(shape, generator=generator) * scale


def _linear(name: str, out_features: int, in_features: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    weight = _random((out_features, in_features), generator)
    return {f"{name}.weight": weight, f"{name}.bias": _random((out_features,), generator, scale=0.1)}


def _layer_norm(name: str, width: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    weight = 1 + _random((width,), generator, scale=0.1)
    return {f"{name}.weight": weight, f"{name}.bias": _random((width,), generator, scale=0.1)}
