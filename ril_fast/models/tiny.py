"""Tiny random SD1.5- and SDXL-shaped pipelines for CPU tests, and the tiny tokenizer vocabulary.

    python -m ril_fast.models.tiny --kind sdxl --out /tmp/tiny_sdxl   # a diffusers folder, no hub needed
    python -m ril_fast.train --config configs/sdxl.json --set model.path=/tmp/tiny_sdxl ...

Components are built from code with a seed set before each one (the way diffusers' own tests build
``get_dummy_components``), so the same seed always gives the same weights. The tokenizer is a real
``CLIPTokenizer`` over a handmade vocabulary (``ril_fast/assets/tiny_vocab``): a few hundred prompt words
(colours, shapes, animals, ...) that each encode to one token, so no hub access is ever needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

VOCAB_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_vocab"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's context length; the tiny text encoders keep it so embeddings have SD's (B, 77, D) layout.
MAX_LENGTH = 77
# Characters that get a token of their own, so unknown words degrade to characters instead of <unk>.
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()&"


def build_tiny_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Builds a CLIP-BPE vocabulary and merge list under which every word of ``words`` is one token.

    CLIP's BPE splits a word into characters, the last one carrying ``</w>``, then applies merges. Without
    merges every word would stay split into characters. The merges here only ever join one character with
    a word-final suffix (``"r" + "ed</w>" -> "red</w>"``); at any time the only joinable pair is then the
    last plain character with the suffix, so merge ranks cannot interfere and each listed word always
    ends as a single token, while any other word falls back to characters and partial suffixes.

    Args:
        words (list[str]): lowercase words made of the characters in ``_CHARS``.

    Returns:
        (vocab, merges): token -> id (specials last, as in CLIP), and merge lines without the header.
    """
    words = list(dict.fromkeys(w.strip().lower() for w in words if w.strip()))
    bad = [w for w in words if any(c not in _CHARS for c in w)]
    if bad:
        raise ValueError(f"tiny vocab words {bad[:5]} use characters outside {_CHARS!r}; use plain lowercase words")
    tokens = list(_CHARS) + [c + "</w>" for c in _CHARS] + [w + "</w>" for w in words]
    merges = []
    for w in words:
        for i in range(len(w) - 2, -1, -1):  # build the word right to left from its final character
            suffix = w[i + 1 :] + "</w>"
            merges.append(f"{w[i]} {suffix}")
            tokens.append(w[i:] + "</w>")
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, list(dict.fromkeys(merges))


def read_tiny_words(vocab_dir: Path = VOCAB_DIR) -> list[str]:
    """The word list the tiny vocabulary was generated from (``words.txt``, ``#`` lines are comments)."""
    lines = (vocab_dir / "words.txt").read_text().splitlines()
    return [w.strip() for w in lines if w.strip() and not w.startswith("#")]


def write_tiny_vocab(vocab_dir: Path = VOCAB_DIR) -> None:
    """Regenerates ``vocab.json`` and ``merges.txt`` from ``words.txt`` (atomic writes)."""
    vocab, merges = build_tiny_vocab(read_tiny_words(vocab_dir))
    _atomic_write(vocab_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    _atomic_write(vocab_dir / "merges.txt", "#version: 0.2\n" + "".join(m + "\n" for m in merges))


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def tiny_tokenizer():
    """A ``CLIPTokenizer`` over the tiny vocabulary, with CLIP's 77-token context."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=str(VOCAB_DIR / "vocab.json"), merges=str(VOCAB_DIR / "merges.txt"), model_max_length=MAX_LENGTH
    )


def _text_config(tokenizer, hidden_size: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=3,  # >= 2 so SDXL's penultimate hidden state differs from the last one
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=projection_dim,
        # Real ids (not CLIP's legacy eos_token_id=2), so pooling picks the first EOS position.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_pipeline(kind: str = "sd", seed: int = 0, image_size: int = 32):
    """Builds a tiny random ``StableDiffusionPipeline`` (kind "sd") or ``StableDiffusionXLPipeline`` ("sdxl").

    Args:
        kind (str): "sd" (one CLIP encoder, cross_attention_dim 32) or "sdxl" (two encoders, the second
            with projection; UNet ``addition_embed_type="text_time"``). Default "sd".
        seed (int): seeds every component. Default 0.
        image_size (int): default image size in pixels (the VAE downsamples by 2). Default 32.

    Returns:
        A diffusers pipeline in fp32 on CPU with a ``DDIMScheduler`` and no safety checker.

    Raises:
        ValueError: unknown kind or an image size not divisible by 4.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in ("sd", "sdxl"):
        raise ValueError(f"tiny model kind {kind!r} is unknown; allowed: 'sd', 'sdxl'")
    if image_size % 4 or image_size <= 0:
        raise ValueError(f"tiny image_size {image_size} must be a positive multiple of 4 (VAE x2, UNet x2)")
    latent_size = image_size // 2
    tokenizer = tiny_tokenizer()
    if kind == "sd":
        te_dims = [(32, 32)]  # (hidden_size, projection_dim)
    else:
        # Different widths for the two encoders so a wrong concatenation order changes shapes, not just values.
        te_dims = [(32, 32), (48, 24)]
    cross_dim = sum(h for h, _ in te_dims)

    unet_kwargs = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    )
    if kind == "sdxl":
        unet_kwargs.update(
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            # 6 time ids x addition_time_embed_dim + the pooled width of text encoder 2 (its projection_dim).
            projection_class_embeddings_input_dim=6 * 8 + te_dims[-1][1],
        )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_kwargs)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=image_size,
        scaling_factor=0.18215 if kind == "sd" else 0.13025,  # SD1.5's and SDXL's VAE scaling factors
    )
    encoders = []
    for i, (hidden, proj) in enumerate(te_dims):
        torch.manual_seed(seed + i)
        cls = CLIPTextModelWithProjection if (kind == "sdxl" and i == 1) else CLIPTextModel
        encoders.append(cls(_text_config(tokenizer, hidden, proj)))
    for module in [unet, vae, *encoders]:
        module.eval()
    if kind == "sd":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def save_tiny_pipeline(path: str | os.PathLike, kind: str = "sd", seed: int = 0, image_size: int = 32) -> str:
    """Saves ``build_tiny_pipeline(kind, seed, image_size)`` as a diffusers folder (safetensors).

    The folder is written next to ``path`` under a temporary name and moved into place, so a reader
    never sees a half-written model. An existing folder at ``path`` is replaced.

    Returns:
        str: ``path``.
    """
    path = Path(path)
    pipe = build_tiny_pipeline(kind, seed, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp"))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


KINDS = {"sd15": "sd", "sdxl": "sdxl"}  # CLI name -> build_tiny_pipeline kind


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ril_fast.models.tiny",
                                 description="Write a tiny random diffusers pipeline folder (model_index.json, "
                                             "unet, vae, text encoder(s), tokenizer(s), scheduler) that "
                                             "ril_fast.train loads as model.path, with no hub access.")
    ap.add_argument("--kind", required=True, choices=sorted(KINDS), help="architecture: sd15 or sdxl")
    ap.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    ap.add_argument("--seed", type=int, default=0, help="seeds every component (default 0)")
    ap.add_argument("--image-size", type=int, default=32, help="default image size in pixels (default 32)")
    args = ap.parse_args(argv)
    if args.image_size <= 0 or args.image_size % 4:
        ap.error(f"--image-size must be a positive multiple of 4, got {args.image_size}")
    path = save_tiny_pipeline(args.out, KINDS[args.kind], args.seed, args.image_size)
    print(f"wrote a tiny random {args.kind} pipeline to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
