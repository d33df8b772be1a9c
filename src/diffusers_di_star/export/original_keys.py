"""Diffusers <-> original ("single-file") key layouts of SDXL and SD1.x/2.x, derived from the architectures.

The original layout is Stability AI's ``generative-models`` (sgm) code for SDXL and CompVis' ``ldm`` code for
SD1.x/2.x (the same UNet and VAE names), which ComfyUI, A1111/Forge and kohya load:

* UNet (``openaimodel.UNetModel``): ``input_blocks.{i}`` / ``middle_block.{i}`` / ``output_blocks.{i}`` are flat
  lists of ``[ResBlock, SpatialTransformer, Downsample/Upsample]`` groups, where Diffusers nests
  ``down_blocks.{b}.resnets.{j}`` / ``.attentions.{j}``. The transformer blocks inside are named identically.
* VAE (``ldm.modules.diffusionmodules.model``): ``down.{i}.block.{j}``, decoder ``up`` blocks numbered in reverse,
  and 1x1 convolutions where Diffusers' mid-block attention has linear layers.
* CLIP-L (SDXL's ``conditioner.embedders.0``, SD1.x's ``cond_stage_model``) keeps the Hugging Face layout under
  ``transformer.text_model.``.
* OpenCLIP (SDXL's bigG ``conditioner.embedders.1``, SD2.x's ViT-H ``cond_stage_model``) uses open_clip's layout:
  ``model.`` + one fused ``in_proj`` for q/k/v, ``text_projection`` stored as the transposed matrix (``x @ P``),
  plus ``logit_scale``. SD2.x's Diffusers text encoder has no projection (the UNet reads hidden states only).

Which layout a UNet has is :func:`unet_version` (``"sdxl"``, ``"sd2"`` or ``"sd1"``), read from its config as ComfyUI
tells SD1.x (convolution ``proj_in``) from SD2.x (linear) and SDXL (added ``text_time`` conditioning).

Each module pairs a Diffusers module path with its original path (:class:`Block`); a key is renamed by its longest
mapped prefix, and a few layers inside a block are renamed by the block's ``sublayers``. The same table serves both
directions, so the two can never disagree. Functions here take and return state dicts only (no I/O) and work on
meta tensors, so the full-size layout can be checked without memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "V_PRED_KEY",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "CLIP_L_PREFIX",
    "CLIP_G_PREFIX",
    "SD1_CLIP_PREFIX",
    "SD2_CLIP_PREFIX",
    "Block",
    "KeyMap",
    "check_unet_config",
    "unet_version",
    "unet_key_map",
    "vae_key_map",
    "unet_to_original",
    "unet_from_original",
    "vae_to_original",
    "vae_from_original",
    "clip_l_to_original",
    "clip_l_from_original",
    "clip_g_to_original",
    "clip_g_from_original",
]

UNET_PREFIX = "model.diffusion_model."
#: How a single file says "v-prediction": an empty tensor under this top-level key. ComfyUI's SDXL model detection
#: (``supported_models.SDXL.model_type``) reads it, and kohya's sd-scripts write it for v-parameterised SDXL.
V_PRED_KEY = "v_pred"
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
#: SD1.x's CLIP-L and SD2.x's OpenCLIP ViT-H, as Diffusers' ``single_file_utils.CHECKPOINT_KEY_NAMES`` finds them.
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_CLIP_PREFIX = "cond_stage_model.model."

# open_clip initialises logit_scale to log(1/0.07) and training saturates it at its clamp, log(100): the value the
# published SDXL checkpoint carries. Only contrastive training reads it; it is written so that the key set is complete.
_CLIP_G_LOGIT_SCALE = math.log(100.0)

_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_CLIP_G_LAYER = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
# setting -> (the values the layout supports, Diffusers' default when a config omits it)
_UNET_SETTINGS = {
    "addition_embed_type": (("text_time", None), None),
    "class_embed_type": ((None,), None),
    "mid_block_type": (("UNetMidBlock2DCrossAttn",), "UNetMidBlock2DCrossAttn"),
}
_SUPPORTED_DOWN_BLOCKS = {"DownBlock2D", "CrossAttnDownBlock2D"}
_SUPPORTED_UP_BLOCKS = {"UpBlock2D", "CrossAttnUpBlock2D"}


@dataclass(frozen=True)
class Block:
    """One module in both layouts; ``sublayers`` lists (diffusers, original) names of its children that differ."""

    diffusers: str
    original: str
    sublayers: tuple[tuple[str, str], ...] = ()


@dataclass
class KeyMap:
    """Renames keys between the two layouts by their longest mapped module prefix."""

    blocks: list[Block]
    _by_diffusers: dict[str, Block] = field(init=False, repr=False)
    _by_original: dict[str, Block] = field(init=False, repr=False)

    def __post_init__(self):
        self._by_diffusers = {b.diffusers: b for b in self.blocks}
        self._by_original = {b.original: b for b in self.blocks}

    def to_original(self, key: str) -> str:
        """A Diffusers key (or module path) -> its original name; ``KeyError`` if no block of the layout holds it."""
        return self._rename(key, self._by_diffusers, to_original=True)

    def to_diffusers(self, key: str) -> str:
        """An original key (or module path) -> its Diffusers name; ``KeyError`` if no block of the layout holds it."""
        return self._rename(key, self._by_original, to_original=False)

    @staticmethod
    def _rename(key: str, index: dict[str, Block], to_original: bool) -> str:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            block = index.get(".".join(parts[:n]))
            if block is None:
                continue
            rest = ".".join(parts[n:])
            for diffusers_name, original_name in block.sublayers:
                src, dst = (diffusers_name, original_name) if to_original else (original_name, diffusers_name)
                if rest == src or rest.startswith(src + "."):
                    rest = dst + rest[len(src) :]
                    break
            head = block.original if to_original else block.diffusers
            return f"{head}.{rest}" if rest else head
        raise KeyError(key)


def check_unet_config(config) -> None:
    """Raise ``ValueError`` naming the first setting outside the SDXL / SD1.x / SD2.x layout (what the mapping
    supports)."""
    config = dict(config)
    for name, (supported, default) in _UNET_SETTINGS.items():
        if config.get(name, default) not in supported:
            raise ValueError(
                f"not an SDXL or SD1.x/2.x UNet: {name}={config.get(name, default)!r} (those have {supported})."
            )
    if not isinstance(config.get("layers_per_block"), int):
        raise ValueError(
            f"not an SDXL or SD1.x/2.x UNet: layers_per_block={config.get('layers_per_block')!r} (they have one int)."
        )
    down = set(config["down_block_types"]) - _SUPPORTED_DOWN_BLOCKS
    unsupported = down | (set(config["up_block_types"]) - _SUPPORTED_UP_BLOCKS)
    if unsupported:
        raise ValueError(
            f"not an SDXL or SD1.x/2.x UNet: block types {sorted(unsupported)} (they use (CrossAttn)Down/UpBlock2D)."
        )


def unet_version(config) -> str:
    """``"sdxl"`` (added ``text_time`` conditioning), ``"sd2"`` (linear transformer projections) or ``"sd1"``."""
    config = dict(config)
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("use_linear_projection") else "sd1"


def unet_key_map(config) -> KeyMap:
    """The UNet layout for a Diffusers ``UNet2DConditionModel`` config (SDXL, SD1.x/2.x or any config of theirs)."""
    check_unet_config(config)
    blocks = [
        Block("time_embedding.linear_1", "time_embed.0"),
        Block("time_embedding.linear_2", "time_embed.2"),
        Block("conv_in", "input_blocks.0.0"),
        Block("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
        Block("mid_block.attentions.0", "middle_block.1"),
        Block("mid_block.resnets.1", "middle_block.2", _UNET_RESNET),
        Block("conv_norm_out", "out.0"),
        Block("conv_out", "out.2"),
    ]
    if unet_version(config) == "sdxl":
        blocks += [Block("add_embedding.linear_1", "label_emb.0.0"), Block("add_embedding.linear_2", "label_emb.0.2")]
    blocks += _unet_down_blocks(config) + _unet_up_blocks(config)
    return KeyMap(blocks)


def _unet_down_blocks(config) -> list[Block]:
    # input_blocks: [conv_in], then per down block `layers_per_block` x [resnet, attention?], then [downsample].
    per_block = config["layers_per_block"] + 1
    last = len(config["down_block_types"]) - 1
    blocks = []
    for b, block_type in enumerate(config["down_block_types"]):
        for j in range(config["layers_per_block"]):
            i = 1 + b * per_block + j
            blocks.append(Block(f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0", _UNET_RESNET))
            if block_type.startswith("CrossAttn"):
                blocks.append(Block(f"down_blocks.{b}.attentions.{j}", f"input_blocks.{i}.1"))
        if b < last:
            blocks.append(Block(f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{(b + 1) * per_block}.0.op"))
    return blocks


def _unet_up_blocks(config) -> list[Block]:
    # output_blocks: per up block `layers_per_block + 1` x [resnet, attention?], the last one also [upsample].
    per_block = config["layers_per_block"] + 1
    last = len(config["up_block_types"]) - 1
    blocks = []
    for b, block_type in enumerate(config["up_block_types"]):
        has_attention = block_type.startswith("CrossAttn")
        for j in range(per_block):
            i = b * per_block + j
            blocks.append(Block(f"up_blocks.{b}.resnets.{j}", f"output_blocks.{i}.0", _UNET_RESNET))
            if has_attention:
                blocks.append(Block(f"up_blocks.{b}.attentions.{j}", f"output_blocks.{i}.1"))
        if b < last:
            position = 2 if has_attention else 1
            blocks.append(Block(f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{i}.{position}.conv"))
    return blocks


def vae_key_map(config) -> KeyMap:
    """The ``AutoencoderKL`` layout; the decoder's ``up`` blocks are numbered from the bottom in the original."""
    n = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    blocks = [Block(name, name) for name in ("quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        blocks += [
            Block(f"{part}.conv_in", f"{part}.conv_in"),
            Block(f"{part}.conv_norm_out", f"{part}.norm_out"),
            Block(f"{part}.conv_out", f"{part}.conv_out"),
            Block(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION),
        ]
        blocks += [Block(f"{part}.mid_block.resnets.{j}", f"{part}.mid.block_{j + 1}", _VAE_RESNET) for j in range(2)]
    for i in range(n):
        up = n - 1 - i  # the decoder's first up block is the original's highest-numbered one
        blocks += [
            Block(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET)
            for j in range(layers)
        ]
        blocks += [
            Block(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", _VAE_RESNET)
            for j in range(layers + 1)
        ]
        blocks += [
            Block(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"),
            Block(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{up}.upsample.conv"),
        ]
    return KeyMap(blocks)


def _rename_all(state_dict: dict[str, torch.Tensor], rename, what: str) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state_dict.items():
        try:
            renamed[rename(key)] = value
        except KeyError:
            raise ValueError(f"{what}: unexpected key {key!r}; the weights do not have the expected layout.") from None
    return renamed


def unet_to_original(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Diffusers UNet state dict -> ``model.diffusion_model.*`` keys (the same tensor objects, renamed)."""
    key_map = unet_key_map(config)
    return _rename_all(state_dict, lambda k: UNET_PREFIX + key_map.to_original(k), "UNet")


def unet_from_original(checkpoint: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The ``model.diffusion_model.*`` part of a single-file checkpoint -> a Diffusers UNet state dict."""
    key_map = unet_key_map(config)
    unet = {k[len(UNET_PREFIX) :]: v for k, v in checkpoint.items() if k.startswith(UNET_PREFIX)}
    return _rename_all(unet, key_map.to_diffusers, "UNet")


def _is_vae_attention_weight(original_key: str) -> bool:
    return ".mid.attn_1." in original_key and original_key.endswith(
        ("q.weight", "k.weight", "v.weight", "proj_out.weight")
    )


def vae_to_original(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> ``first_stage_model.*`` (attention linears become 1x1 convs)."""
    renamed = _rename_all(state_dict, vae_key_map(config).to_original, "VAE")
    return {
        VAE_PREFIX + k: v[:, :, None, None] if _is_vae_attention_weight(k) and v.ndim == 2 else v
        for k, v in renamed.items()
    }


def vae_from_original(checkpoint: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The ``first_stage_model.*`` part of a single-file checkpoint -> a Diffusers ``AutoencoderKL`` state dict."""
    vae = {k[len(VAE_PREFIX) :]: v for k, v in checkpoint.items() if k.startswith(VAE_PREFIX)}
    vae = {k: v[:, :, 0, 0] if _is_vae_attention_weight(k) and v.ndim == 4 else v for k, v in vae.items()}
    return _rename_all(vae, vae_key_map(config).to_diffusers, "VAE")


def clip_l_to_original(
    text_model_state_dict: dict[str, torch.Tensor], prefix: str = CLIP_L_PREFIX
) -> dict[str, torch.Tensor]:
    """CLIP-L ``text_model`` state dict (keys relative to ``text_model``) -> ``prefix + "text_model." + key``
    (SDXL's ``conditioner.embedders.0.transformer.``, SD1.x's :data:`SD1_CLIP_PREFIX`).

    Adds the ``position_ids`` buffer that the published checkpoints carry (int64; A1111 treats a missing or float
    one as a broken CLIP).
    """
    checkpoint = {f"{prefix}text_model.{k}": v for k, v in text_model_state_dict.items()}
    positions = text_model_state_dict["embeddings.position_embedding.weight"].shape[0]
    checkpoint[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return checkpoint


def clip_l_from_original(checkpoint: dict[str, torch.Tensor], prefix: str = CLIP_L_PREFIX) -> dict[str, torch.Tensor]:
    """The CLIP-L part under ``prefix`` -> its ``text_model`` state dict (``position_ids`` is a buffer: dropped)."""
    prefix = f"{prefix}text_model."
    return {
        k[len(prefix) :]: v
        for k, v in checkpoint.items()
        if k.startswith(prefix) and not k.endswith("embeddings.position_ids")
    }


def _clip_g_key_map(num_layers: int) -> KeyMap:
    blocks = [
        Block("embeddings.token_embedding", "token_embedding"),
        Block("embeddings.position_embedding.weight", "positional_embedding"),
        Block("final_layer_norm", "ln_final"),
    ]
    blocks += [Block(f"encoder.layers.{i}", f"transformer.resblocks.{i}", _CLIP_G_LAYER) for i in range(num_layers)]
    return KeyMap(blocks)


def _num_layers(keys, pattern: str) -> int:
    return len({k.split(pattern, 1)[1].split(".", 1)[0] for k in keys if pattern in k})


def clip_g_to_original(
    text_model_state_dict: dict[str, torch.Tensor],
    text_projection: torch.Tensor | None,
    prefix: str = CLIP_G_PREFIX,
) -> dict[str, torch.Tensor]:
    """An OpenCLIP text model as Hugging Face ``text_model`` (+ ``text_projection.weight``) -> open_clip keys under
    ``prefix`` (SDXL's bigG ``conditioner.embedders.1.model.``, SD2.x's ViT-H :data:`SD2_CLIP_PREFIX`).

    q/k/v projections are fused into open_clip's ``in_proj_weight``/``in_proj_bias`` (in that order) and the
    projection is stored transposed, as open_clip applies it (``pooled @ text_projection``), with ``logit_scale``.
    SD2.x's encoder has no projection (``text_projection=None``): neither is written, and its layers are the 23 that
    Diffusers keeps (SD2.x reads the output of open_clip's 23rd of 24 layers; the 24th, never run, is not written).
    """
    num_layers = _num_layers(text_model_state_dict, "encoder.layers.")
    key_map = _clip_g_key_map(num_layers)
    qkv = {k: v for k, v in text_model_state_dict.items() if k.split(".")[-2] in ("q_proj", "k_proj", "v_proj")}
    rest = {k: v for k, v in text_model_state_dict.items() if k not in qkv}
    checkpoint = _rename_all(rest, lambda k: prefix + key_map.to_original(k), "OpenCLIP text encoder")
    for i in range(num_layers):
        for kind in ("weight", "bias"):
            parts = [qkv[f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            checkpoint[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts)
    if text_projection is not None:
        checkpoint[f"{prefix}text_projection"] = text_projection.T
        checkpoint[f"{prefix}logit_scale"] = torch.tensor(_CLIP_G_LOGIT_SCALE, dtype=text_projection.dtype)
    return checkpoint


def clip_g_from_original(
    checkpoint: dict[str, torch.Tensor], prefix: str = CLIP_G_PREFIX
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The open_clip part under ``prefix`` -> (``text_model`` state dict, ``text_projection.weight`` or None)."""
    model = {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    text_projection = model.pop("text_projection", None)
    model.pop("logit_scale", None)
    num_layers = _num_layers(model, "transformer.resblocks.")
    fused = {k: model.pop(k) for k in list(model) if ".attn.in_proj_" in k}
    text_model = _rename_all(model, _clip_g_key_map(num_layers).to_diffusers, "OpenCLIP text encoder")
    for i in range(num_layers):
        for kind in ("weight", "bias"):
            q, k, v = fused[f"transformer.resblocks.{i}.attn.in_proj_{kind}"].chunk(3)
            for name, part in zip("qkv", (q, k, v), strict=True):
                text_model[f"encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = part
    return text_model, None if text_projection is None else text_projection.T
