"""Tiny SDXL components built fully offline, for tests, the demo and users' own tests.

Every piece has the real SDXL layout (two CLIP text encoders with a CLIP BPE tokenizer each, a UNet with
``addition_embed_type="text_time"``, an ``AutoencoderKL`` with a down-sampling factor of 8 and SDXL's scheduler)
but only a few thousand parameters, so a whole pipeline builds, saves and generates a 64×64 image in well under a
second on a CPU. Nothing is downloaded: the tokenizers are trained here with the ``tokenizers`` library. The tiny
SD1.5/2.x (:func:`get_tiny_sd_components`) has one text encoder and no added conditioning; the tiny SD3 / SD3.5
(:func:`get_tiny_sd3_components`) a flow-matching ``SD3Transformer2DModel``, CLIP-L, CLIP-G and an optional T5; the
tiny FLUX.1 (:func:`get_tiny_flux_components`) a guidance-distilled ``FluxTransformer2DModel``, CLIP-L and T5.

>>> from diffusers_di_star.testing import get_tiny_sdxl_components, save_tiny_sdxl_pipeline
>>> components = get_tiny_sdxl_components(seed=0)          # dict for StableDiffusionXLPipeline(**components)
>>> save_tiny_sdxl_pipeline("tiny-sdxl")                     # a complete SDXL-layout folder
"""

from __future__ import annotations

import os
from collections import Counter

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Regex, normalizers, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

__all__ = [
    "TINY_PROMPTS",
    "get_tiny_tokenizer",
    "get_tiny_text_encoders",
    "get_tiny_unet",
    "get_tiny_vae",
    "get_sdxl_scheduler",
    "get_tiny_sdxl_components",
    "save_tiny_sdxl_pipeline",
    "get_tiny_sd_unet",
    "get_sd_scheduler",
    "get_tiny_sd_components",
    "save_tiny_sd_pipeline",
    "get_tiny_t5_tokenizer",
    "get_tiny_sd3_transformer",
    "get_sd3_scheduler",
    "get_tiny_sd3_components",
    "save_tiny_sd3_pipeline",
    "get_tiny_flux_transformer",
    "get_flux_scheduler",
    "get_tiny_flux_components",
    "save_tiny_flux_pipeline",
]

#: Prompts used to train the tiny tokenizer; also handy as test prompts.
TINY_PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a watercolor painting of a fox in a snowy forest",
    "a cat wearing sunglasses sitting on a red chair",
    "an oil painting of a lighthouse at sunset, dramatic clouds",
    "a bowl of ramen with chopsticks, studio lighting",
    "a small robot reading a book in a cozy library",
    "portrait of an old man with a beard, black and white photo",
    "a futuristic city skyline at night with neon lights",
)

#: Text-encoder widths of the tiny SDXL: CLIP-L stand-in (32) and bigG stand-in (64, projection 64).
TEXT_HIDDEN_SIZES = (32, 64)
ADDITION_TIME_EMBED_DIM = 8
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _clip_normalizer_and_pre_tokenizer():
    # The same text pipeline as transformers' CLIPTokenizer, so the trained merges are the ones it will apply.
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return normalizer, pre_tokenizer


def _learn_bpe_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned greedily, ties broken lexicographically (so the result never varies).

    ``tokenizers``' own ``BpeTrainer`` breaks ties by hash-map order, which changes from run to run; a test fixture
    must not.
    """
    counts = Counter(words)
    symbols = {word: [*word[:-1], word[-1] + "</w>"] for word in counts}
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, seq in symbols.items():
            for pair in zip(seq, seq[1:], strict=False):
                pairs[pair] += counts[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, seq in symbols.items():
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    merged.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            symbols[word] = merged
    return merges


def get_tiny_tokenizer(num_merges: int = 120, pad_token: str = _EOS) -> CLIPTokenizer:
    """A CLIP-layout BPE tokenizer trained locally on :data:`TINY_PROMPTS` (deterministic, no download).

    The text is normalised and split by the ``tokenizers`` pipeline CLIP uses; every byte has a token with and
    without the ``</w>`` end-of-word suffix, so any text encodes without unknowns. SDXL's second tokenizer pads with
    ``"!"``: pass ``pad_token="!"`` for it.
    """
    normalizer, pre_tokenizer = _clip_normalizer_and_pre_tokenizer()
    words = [
        word for prompt in TINY_PROMPTS for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(prompt))
    ]
    merges = _learn_bpe_merges(words, num_merges)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [_BOS, _EOS, *alphabet, *(char + "</w>" for char in alphabet), *("".join(pair) for pair in merges)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def get_tiny_text_encoders(vocab_size: int, eos_token_id: int, seed: int = 0):
    """The two SDXL text encoders: a CLIP-L stand-in (hidden 32) and a bigG stand-in with projection (hidden 64)."""
    encoders = []
    for cls, hidden_size in zip((CLIPTextModel, CLIPTextModelWithProjection), TEXT_HIDDEN_SIZES, strict=True):
        torch.manual_seed(seed)
        encoders.append(cls(_tiny_clip_config(vocab_size, hidden_size, TEXT_HIDDEN_SIZES[1], eos_token_id)).eval())
    return tuple(encoders)


def _tiny_clip_config(vocab_size: int, hidden_size: int, projection_dim: int, eos_token_id: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=eos_token_id,
        pad_token_id=1,
    )


def get_tiny_unet(
    seed: int = 0, sample_size: int = 8, block_out_channels: tuple[int, int] = (32, 64)
) -> UNet2DConditionModel:
    """An SDXL-layout UNet (``text_time`` added conditioning, cross-attention over both text encoders)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        **_tiny_unet_blocks(sample_size, block_out_channels),
        cross_attention_dim=sum(TEXT_HIDDEN_SIZES),
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TEXT_HIDDEN_SIZES[1],
    ).eval()


def get_tiny_sd_unet(seed: int = 0, sample_size: int = 8) -> UNet2DConditionModel:
    """An SD1.5/2.x-layout UNet: cross-attention over one text encoder, no added conditioning."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        **_tiny_unet_blocks(sample_size, (32, 64)), cross_attention_dim=TEXT_HIDDEN_SIZES[0]
    ).eval()


def _tiny_unet_blocks(sample_size: int, block_out_channels: tuple[int, int]) -> dict:
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        norm_num_groups=16,
    )


def get_tiny_vae(
    seed: int = 0, scaling_factor: float = 0.13025, latent_channels: int = 4, shift_factor: float | None = None
) -> AutoencoderKL:
    """An ``AutoencoderKL`` with SDXL's latent layout: 4 channels, down-sampling factor 8, scaling factor 0.13025
    (SD1.5/2.x: pass 0.18215). A ``shift_factor`` gives SD3's layout (16 channels, no quant convs)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
        force_upcast=True,
    ).eval()


def get_sdxl_scheduler(prediction_type: str = "epsilon") -> EulerDiscreteScheduler:
    """SDXL base's scheduler config (scaled-linear betas 0.00085 → 0.012 over 1000 steps, epsilon prediction).

    ``prediction_type="v_prediction"`` gives the config of an SDXL v-prediction finetune (same schedule).
    """
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        steps_offset=1,
        timestep_spacing="leading",
    )


def get_tiny_sdxl_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """All components of a tiny SDXL, as keyword arguments of ``StableDiffusionXLPipeline`` (or ours).

    Deterministic: the same ``seed`` gives bit-identical weights and tokenizers. ``prediction_type`` is the
    scheduler's (``"v_prediction"`` for a tiny SDXL v-pred finetune; the random UNet is the same).
    """
    tokenizer = get_tiny_tokenizer()
    tokenizer_2 = get_tiny_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    text_encoder, text_encoder_2 = get_tiny_text_encoders(len(tokenizer), tokenizer.eos_token_id, seed=seed)
    return {
        "vae": get_tiny_vae(seed),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": get_tiny_unet(seed),
        "scheduler": get_sdxl_scheduler(prediction_type),
    }


def get_sd_scheduler(prediction_type: str = "epsilon") -> PNDMScheduler:
    """SD1.5's scheduler config (the SDXL betas, PNDM); ``prediction_type="v_prediction"`` as SD2.x-768."""
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def get_tiny_sd_components(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """All components of a tiny SD1.5 (ε) or SD2.x-v (``prediction_type="v_prediction"``), as keyword arguments of
    ``StableDiffusionPipeline`` (or ``DIStarSDPipeline``): one CLIP text encoder (hidden 32), no safety checker.
    Deterministic in ``seed``."""
    tokenizer = get_tiny_tokenizer()
    text_encoder = get_tiny_text_encoders(len(tokenizer), tokenizer.eos_token_id, seed=seed)[0]
    return {
        "vae": get_tiny_vae(seed, scaling_factor=0.18215),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": get_tiny_sd_unet(seed),
        "scheduler": get_sd_scheduler(prediction_type),
        "safety_checker": None,
        "feature_extractor": None,
    }


def save_tiny_sd_pipeline(path: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """Save a complete SD1.5-layout (or SD2.x-v) pipeline folder, loadable by ``StableDiffusionPipeline`` and
    ``DIStarSDPipeline``. Returns the path."""
    pipe = StableDiffusionPipeline(**get_tiny_sd_components(seed, prediction_type), requires_safety_checker=False)
    pipe.save_pretrained(path)
    return os.fspath(path)


def save_tiny_sdxl_pipeline(path: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon") -> str:
    """Save a complete SDXL-layout pipeline folder (``model_index.json`` + one subfolder per component).

    The folder is what ``stabilityai/stable-diffusion-xl-base-1.0`` looks like on the Hub, in miniature, and loads
    with ``StableDiffusionXLPipeline.from_pretrained`` and ``DIStarSDXLPipeline.from_pretrained``. Returns the path.
    """
    pipe = StableDiffusionXLPipeline(**get_tiny_sdxl_components(seed, prediction_type), add_watermarker=False)
    pipe.save_pretrained(path)
    return os.fspath(path)


# ---- SD3 / SD3.5 (flow matching) --------------------------------------------------------------------------------

#: Widths of the tiny SD3's text encoders: CLIP-L and CLIP-G stand-ins (pooled: both projections, 32 + 64) and the
#: T5 stand-in, whose width is the transformer's ``joint_attention_dim`` (as T5-XXL's 4096 is SD3's).
SD3_CLIP_HIDDEN_SIZES = (32, 64)
SD3_JOINT_ATTENTION_DIM = 96


def get_tiny_t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer built here: the words of :data:`TINY_PROMPTS` and every printable ASCII character."""
    import string

    words = sorted({word for prompt in TINY_PROMPTS for word in prompt.replace(",", " ,").split()})
    chars = sorted(set(string.printable.strip()))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -1.0) for word in words] + [(char, -5.0) for char in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _tiny_t5_encoder(vocab_size: int, width: int, seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
    )
    return T5EncoderModel(config).eval()


def get_tiny_sd3_transformer(seed: int = 0, sample_size: int = 8, **overrides) -> SD3Transformer2DModel:
    """An SD3.5-Medium-layout transformer (patch 2, 16 latent channels, a dual-attention first block, RMS q/k norm);
    ``overrides`` replace config entries (e.g. other widths)."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=SD3_JOINT_ATTENTION_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=sum(SD3_CLIP_HIDDEN_SIZES),
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    return SD3Transformer2DModel(**(config | overrides)).eval()


def get_sd3_scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    """SD3 / SD3.5's scheduler config: rectified flow over 1000 training timesteps, σ shifted by 3.0."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def get_tiny_sd3_components(seed: int = 0, with_t5: bool = True) -> dict:
    """All components of a tiny SD3 / SD3.5, as keyword arguments of ``StableDiffusion3Pipeline`` (or
    ``DIStarSD3Pipeline``); ``with_t5=False`` leaves ``text_encoder_3`` and ``tokenizer_3`` out, as diffusers allows.
    Deterministic in ``seed``."""
    tokenizer = get_tiny_tokenizer()
    tokenizer_2 = get_tiny_tokenizer(pad_token="!")
    text_encoders = []
    for hidden_size in SD3_CLIP_HIDDEN_SIZES:
        torch.manual_seed(seed)
        config = _tiny_clip_config(len(tokenizer), hidden_size, hidden_size, tokenizer.eos_token_id)
        text_encoders.append(CLIPTextModelWithProjection(config).eval())
    tokenizer_3 = text_encoder_3 = None
    if with_t5:
        tokenizer_3 = get_tiny_t5_tokenizer()
        text_encoder_3 = _tiny_t5_encoder(len(tokenizer_3), SD3_JOINT_ATTENTION_DIM, seed)
    return {
        "transformer": get_tiny_sd3_transformer(seed),
        "scheduler": get_sd3_scheduler(),
        "vae": get_tiny_vae(seed, scaling_factor=1.5305, latent_channels=16, shift_factor=0.0609),
        "text_encoder": text_encoders[0],
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoders[1],
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": tokenizer_3,
    }


def save_tiny_sd3_pipeline(path: str | os.PathLike, seed: int = 0, with_t5: bool = True) -> str:
    """Save a complete SD3-layout pipeline folder, loadable by ``StableDiffusion3Pipeline`` and
    ``DIStarSD3Pipeline``. Returns the path."""
    StableDiffusion3Pipeline(**get_tiny_sd3_components(seed, with_t5)).save_pretrained(path)
    return os.fspath(path)


# ---- FLUX.1 (flow matching, guidance-distilled) -----------------------------------------------------------------

#: Width of the tiny FLUX's T5 stand-in, the transformer's ``joint_attention_dim`` (FLUX.1: T5-XXL's 4096).
FLUX_JOINT_ATTENTION_DIM = 32


def get_tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = True, **overrides) -> FluxTransformer2DModel:
    """A FLUX.1-dev-layout transformer: 16 latent channels packed in 2×2 patches (64 inputs), one double-stream and one
    single-stream block, RoPE over (text, row, column) ids, the guidance embedding (``guidance_embeds=False``: the
    FLUX.1-schnell layout). The sizes of diffusers' own FLUX pipeline tests; ``overrides`` replace config entries."""
    torch.manual_seed(seed)
    config = dict(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX_JOINT_ATTENTION_DIM,
        pooled_projection_dim=TEXT_HIDDEN_SIZES[0],
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    return FluxTransformer2DModel(**(config | overrides)).eval()


def get_flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config: rectified flow, σ shifted by exp(μ) with μ linear in the image sequence length
    (0.5 at 256 tokens, 1.15 at 4096)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def get_tiny_flux_components(seed: int = 0, guidance_embeds: bool = True) -> dict:
    """All components of a tiny FLUX.1-dev (``guidance_embeds=False``: FLUX.1-schnell's transformer layout), as
    keyword arguments of ``FluxPipeline`` (or ``DIStarFluxPipeline``): CLIP-L (pooled, hidden 32), T5 (width 32),
    FLUX's VAE layout (16 channels, scaling 0.3611, shift 0.1159). Deterministic in ``seed``."""
    tokenizer, tokenizer_2 = get_tiny_tokenizer(), get_tiny_t5_tokenizer()
    torch.manual_seed(seed)
    clip_config = _tiny_clip_config(len(tokenizer), TEXT_HIDDEN_SIZES[0], TEXT_HIDDEN_SIZES[0], tokenizer.eos_token_id)
    return {
        "transformer": get_tiny_flux_transformer(seed, guidance_embeds),
        "scheduler": get_flux_scheduler(),
        "vae": get_tiny_vae(seed, scaling_factor=0.3611, latent_channels=16, shift_factor=0.1159),
        "text_encoder": CLIPTextModel(clip_config).eval(),
        "tokenizer": tokenizer,
        "text_encoder_2": _tiny_t5_encoder(len(tokenizer_2), FLUX_JOINT_ATTENTION_DIM, seed),
        "tokenizer_2": tokenizer_2,
    }


def save_tiny_flux_pipeline(path: str | os.PathLike, seed: int = 0, guidance_embeds: bool = True) -> str:
    """Save a complete FLUX.1-layout pipeline folder, loadable by ``FluxPipeline`` and ``DIStarFluxPipeline``.
    Returns the path."""
    FluxPipeline(**get_tiny_flux_components(seed, guidance_embeds)).save_pretrained(path)
    return os.fspath(path)
