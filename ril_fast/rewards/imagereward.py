"""ImageReward v1.0 (THUDM) rebuilt from transformers BLIP parts, differentiable w.r.t. the images.

The ``image-reward`` package pins timm 0.6.13 / fairscale and imports OpenAI ``clip`` and diffusers at
import time; its scorer runs PIL preprocessing. Its model is small to restate, so we rebuild it:

    image -> BLIP ViT (``blip.visual_encoder``; transformers ``BlipVisionModel``, LayerNorm eps 1e-6)
          -> all patch tokens as ``encoder_hidden_states`` of the BERT text encoder with cross-attention
             (``blip.text_encoder``; transformers ``BlipTextModel``, bidirectional self-attention)
          -> hidden state of the first token -> MLP head (``mlp.layers.*``, same layout as the aesthetic head)
          -> (r - 0.16717362830052426) / 1.0333394966054072

exactly as ``ImageReward.score`` / ``score_gard`` do (prompt tokenised with bert-base-uncased, padded and
truncated to 35 tokens; no [ENC] substitution). ``blip_to_hf`` maps the checkpoint's keys; the widths and
layer counts are read from the tensor shapes, head counts are width // 64 (ViT-L: 16, BERT-base: 12).
Typical range: standardised, ~N(0, 1) over the ImageReward benchmark.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ril_fast.rewards import weight_files
from ril_fast.rewards.clip_rewards import _check_batch, _finish, default_device, default_dtype, load_head
from ril_fast.rewards.preprocess import clip_preprocess

IR_MEAN = 0.16717362830052426
IR_STD = 1.0333394966054072
MAX_LENGTH = 35  # ImageReward tokenises prompts to 35 tokens

_VIT_BLOCK = {  # BLIP vit.py (timm layout) -> transformers BlipEncoderLayer
    "norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}  # fmt: skip


def blip_to_hf(sd: dict[str, torch.Tensor], vision_layer_norm_eps: float = 1e-6):
    """ImageReward.pt state dict -> (BlipVisionConfig, vision sd, BlipTextConfig, text sd, head sd)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    ve, te = "blip.visual_encoder.", "blip.text_encoder."
    if ve + "patch_embed.proj.weight" not in sd or "mlp.layers.0.weight" not in sd:
        raise ValueError("not an ImageReward checkpoint: needs blip.visual_encoder.patch_embed.proj.weight and "
                         "mlp.layers.0.weight")
    vis: dict[str, torch.Tensor] = {}
    pat = re.compile(re.escape(ve) + r"blocks\.(\d+)\.(.+)\.(weight|bias)$")
    for k, v in sd.items():
        if not k.startswith(ve):
            continue
        rest = k[len(ve) :]
        if m := pat.match(k):
            i, sub, kind = m.groups()
            if sub not in _VIT_BLOCK:
                raise ValueError(f"unexpected BLIP ViT key {k!r}")
            vis[f"encoder.layers.{i}.{_VIT_BLOCK[sub]}.{kind}"] = v
        elif rest == "cls_token":
            vis["embeddings.class_embedding"] = v
        elif rest == "pos_embed":
            vis["embeddings.position_embedding"] = v
        elif rest.startswith("patch_embed.proj."):
            vis["embeddings.patch_embedding." + rest.rsplit(".", 1)[1]] = v
        elif rest.startswith("norm."):
            vis["post_layernorm." + rest.rsplit(".", 1)[1]] = v
        else:
            raise ValueError(f"unexpected BLIP ViT key {k!r}")
    txt = {k[len(te) :]: v for k, v in sd.items() if k.startswith(te) and not k.endswith("position_ids")}
    head = {k[len("mlp.") :]: v for k, v in sd.items() if k.startswith("mlp.")}

    width = vis["embeddings.patch_embedding.weight"].shape[0]
    patch = vis["embeddings.patch_embedding.weight"].shape[-1]
    grid = round((vis["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    n_vis = 1 + max(int(k.split(".")[2]) for k in vis if k.startswith("encoder.layers."))
    vcfg = BlipVisionConfig(
        hidden_size=width, intermediate_size=vis["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=n_vis, num_attention_heads=width // 64, image_size=grid * patch, patch_size=patch,
        layer_norm_eps=vision_layer_norm_eps, hidden_act="gelu",
    )  # fmt: skip
    t_width = txt["embeddings.word_embeddings.weight"].shape[1]
    n_txt = 1 + max(int(k.split(".")[2]) for k in txt if k.startswith("encoder.layer."))
    tcfg = BlipTextConfig(
        vocab_size=txt["embeddings.word_embeddings.weight"].shape[0], hidden_size=t_width,
        intermediate_size=txt["encoder.layer.0.intermediate.dense.weight"].shape[0], num_hidden_layers=n_txt,
        num_attention_heads=t_width // 64,
        max_position_embeddings=txt["embeddings.position_embeddings.weight"].shape[0],
        encoder_hidden_size=width, layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True,
        bos_token_id=None, sep_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return vcfg, vis, tcfg, txt, head


def _build(cls, config, sd, **kw):
    with torch.device("meta"):
        model = cls(config, **kw)
    model.load_state_dict(sd, strict=True, assign=True)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
    return model


class ImageRewardModel(nn.Module):
    def __init__(self, vision: nn.Module, text: nn.Module, head: nn.Module):
        super().__init__()
        self.vision, self.text, self.head = vision, text, head

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts)
        reward = self.head(out.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return (reward - IR_MEAN) / IR_STD


class ImageRewardReward(nn.Module):
    """ImageReward v1.0. Options: ``checkpoint_path`` (default ``THUDM/ImageReward/ImageReward.pt``),
    ``tokenizer_path`` (bert-base-uncased folder/repo, default ``google-bert/bert-base-uncased``), ``dtype``,
    ``device``, ``gradient_checkpointing``."""

    @staticmethod
    def weight_specs(args: dict) -> list[tuple[str, str, str]]:
        """(option, location, "file" | "dir") of the weights these options load (``rewards.missing_weights``)."""
        return [("checkpoint_path", args["checkpoint_path"], "file"), ("tokenizer_path", args["tokenizer_path"], "dir")]

    def __init__(self, checkpoint_path: str = "THUDM/ImageReward/ImageReward.pt",
                 tokenizer_path: str = "google-bert/bert-base-uncased", dtype=None, device=None,
                 gradient_checkpointing: bool = False):
        device = default_device(device)
        dtype = default_dtype(dtype, device)
        path = weight_files.resolve_file(checkpoint_path, "checkpoint_path")
        tok_folder = weight_files.resolve_dir(tokenizer_path, "tokenizer_path")

        def build():
            from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

            vcfg, vsd, tcfg, tsd, hsd = blip_to_hf(weight_files.load_state_dict(path))
            vision = _finish(_build(BlipVisionModel, vcfg, vsd), dtype, device, gradient_checkpointing)
            text = _finish(_build(BlipTextModel, tcfg, tsd, add_pooling_layer=False), dtype, device,
                           gradient_checkpointing)
            head = weight_files.freeze(load_head(hsd, str(path)).to(device))  # fp32 head, as ImageReward's .float()
            return ImageRewardModel(vision, text, head), AutoTokenizer.from_pretrained(str(tok_folder))

        key = ("imagereward", str(path), str(tok_folder), dtype, device, gradient_checkpointing)
        model, tokenizer = weight_files.cached(key, build)
        self._wrap(model, tokenizer, dtype=dtype, device=device)

    def _wrap(self, model: ImageRewardModel, tokenizer, dtype, device):
        super().__init__()
        self.device, self.dtype, self.tokenizer = device, dtype, tokenizer
        self.__dict__["model"] = model  # shared and frozen: kept out of this module's tree and state_dict
        self.image_size = self.model.vision.config.image_size

    @classmethod
    def from_modules(cls, model: ImageRewardModel, tokenizer, *, dtype: torch.dtype, device: torch.device):
        """The reward around a model built elsewhere, loading no weights (checkpointing is the towers'
        own setting): what ``__init__`` does after loading. The memory planner wraps its meta model."""
        reward = cls.__new__(cls)
        reward._wrap(model, tokenizer, dtype=dtype, device=device)
        return reward

    def to_device(self, device: torch.device) -> None:
        """Move the shared frozen model to ``device``; see ``rewards.place``."""
        self.model.to(device)
        self.device = device

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        prompts = _check_batch(images, prompts)
        # ImageReward's transform is torchvision Resize(224, bicubic) + CenterCrop: round-half-even crop
        pixels = clip_preprocess(images.to(self.device), self.image_size, crop_rounding="round").to(self.dtype)
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        out = self.model(pixels, tok.input_ids.to(self.device), tok.attention_mask.to(self.device))
        return out.to(images.device)
