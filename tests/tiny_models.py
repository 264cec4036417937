"""Tiny random diffusers components for tests, built in-process (no hub) with seeded init.

``tiny_unet`` gives an SD- or SDXL-shaped UNet2DConditionModel; ``tiny_sd_pipeline`` a full
StableDiffusionPipeline whose CLIP tokenizer reads a handmade vocab written to ``tmp_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CROSS_DIM = 32
_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "tree", "house"]


def tiny_unet(seed: int = 0, sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = dict(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=CROSS_DIM, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        sample_size=8, attention_head_dim=(2, 4),
    )
    if sdxl:
        # SDXL: linear projections in the transformers, text_time added conditioning (pooled 32 + 6 time ids x 8).
        kwargs.update(use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=CROSS_DIM + 6 * 8, transformer_layers_per_block=(1, 2))
    return UNet2DConditionModel(**kwargs).eval()


def unet_inputs(seed: int = 1, batch: int = 2, sdxl: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10, 500][:batch] + [250] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 5, CROSS_DIM, generator=g),
    }
    if sdxl:
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, CROSS_DIM, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
        }
    return inputs


def write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """A CLIP BPE vocab of a few whole words (no merges needed beyond the version line)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set("".join(_WORDS)))
    specials = ["<|startoftext|>", "<|endoftext|>", "!"]
    tokens = specials + chars + [c + "</w>" for c in chars] + [w + "</w>" for w in _WORDS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder / "vocab.json", folder / "merges.txt"


def tiny_sd_pipeline(tmp_dir: Path, seed: int = 0):
    """A StableDiffusionPipeline of tiny random parts (UNet from :func:`tiny_unet`)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = write_clip_vocab(Path(tmp_dir) / "vocab")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=16)
    unet = tiny_unet(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CROSS_DIM, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
