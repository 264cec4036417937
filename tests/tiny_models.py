"""Tiny random diffusers components for tests, built in-process (no hub) with seeded init.

``tiny_unet`` gives an SD- or SDXL-shaped UNet2DConditionModel; ``tiny_sd_pipeline`` a full
StableDiffusionPipeline whose CLIP tokenizer reads a handmade vocab written to ``tmp_dir``;
``grouped_unet`` / ``peft_copy`` a tiny UNet with a LoRA adapter group and its PEFT twin;
``rid_config`` a RID config on a saved tiny model, ``perturb_student`` noise on the pair being trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ril_fast import lora
from ril_fast.config import config_from_dict

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


# (rank, alpha) per task: mixed ranks and scales, so a wrong slice or scale shows.
TASKS = [(2, 3.0), (4, 8.0), (3, 1.5)]


def randomize_b(layers, seed=7):
    # B = 0 after add_task would hide every adapter; give each B a non-zero value.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for b in layer.lora_b:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def grouped_unet(sdxl=False, preset="attn", tasks=TASKS):
    unet = tiny_unet(0, sdxl=sdxl)
    layers = lora.inject_adapter_group(unet, preset)
    for t, (r, alpha) in enumerate(tasks):
        lora.add_task(layers, r, alpha, seed=100 + t)
    randomize_b(layers)
    return unet, layers


def peft_copy(layers, sdxl, preset, tasks, n_active):
    from peft import LoraConfig

    unet = tiny_unet(0, sdxl=sdxl)
    targets = list(lora.PRESETS[preset])
    for t, (r, alpha) in enumerate(tasks):
        unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets), adapter_name=f"t{t}")
    with torch.no_grad():
        for layer in layers:
            mod = unet.get_submodule(layer.name)
            for t in range(len(tasks)):
                mod.lora_A[f"t{t}"].weight.copy_(layer.lora_a[t])
                mod.lora_B[f"t{t}"].weight.copy_(layer.lora_b[t])
    unet.set_adapters([f"t{t}" for t in range(n_active)])
    return unet


TRAIN_PROMPTS = ["a red circle", "a blue cat"]


def rid_config(model_dir, sampling=None, **method):
    return config_from_dict({
        "output_dir": "unused",
        "model": {"path": str(model_dir)},
        "method": {"name": "rid", **method},
        "sampling": {"steps": 3, "guidance_scale": 2.0, **(sampling or {})},
        "train": {"batch_size": 2, "lr": 1e-2},
        "tasks": [{"name": "a", "reward": "brightness", "train_prompts": TRAIN_PROMPTS,
                   "eval_prompts": ["a dog"], "steps": 1}],
    })


def perturb_student(layers, std=0.2):
    with torch.no_grad():
        for layer in layers:
            b = layer.trainable_pair()[1]
            b.add_(torch.randn_like(b) * std)  # add, so equal seeds in two tests never give equal values
