"""CLIP-based rewards: LAION aesthetic, PickScore, HPSv2 / v2.1. Differentiable w.r.t. the images.

All three run a transformers ``CLIPModel`` (or its vision half) on images preprocessed in torch
(``preprocess.clip_preprocess``), so the gradient reaches the images; text features carry no gradient.

- ``aesthetic``: OpenAI CLIP ViT-L/14 image embedding, L2-normalised (out of place: the in-place
  ``/=`` of simple-aesthetics-predictor breaks autograd) -> the improved-aesthetic-predictor MLP
  (768-1024-128-64-16-1, dropout, no activations). Range ~1-10; SD1.5 ~5-5.5.
- ``pickscore``: the PickScore_v1 CLIPModel folder; score = ``logit_scale.exp() * cos(img, txt)`` (~18-23).
- ``hpsv2``: open_clip ViT-H-14 weights from the HPS checkpoint, converted to a transformers
  ``CLIPModel`` by ``open_clip_to_hf`` (open_clip itself needs torchvision, which does not import beside
  our CPU torch); score = ``cos(img, txt)`` with **no** logit scale, as ``hpsv2.score`` computes it (~0.27).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ril_fast.rewards import weight_files
from ril_fast.rewards.preprocess import clip_preprocess

LAION_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # tokenizer of PickScore and HPSv2 (open_clip ViT-H-14)
# open_clip ViT-H-14.json: vision width 1280 with head_width 80 -> 16 heads; text width 1024, 16 heads.
VIT_H_14_HEADS = {"vision_heads": 16, "text_heads": 16}
HPS_CHECKPOINTS = {"v2.0": "xswu/HPSv2/HPS_v2_compressed.pt", "v2.1": "xswu/HPSv2/HPS_v2.1_compressed.pt"}


class MLPHead(nn.Module):
    """improved-aesthetic-predictor / ImageReward head; state-dict keys ``layers.{0,2,4,6,7}.*``."""

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_head(sd: dict[str, torch.Tensor], source: str) -> MLPHead:
    sd = {k.removeprefix("mlp."): v for k, v in sd.items()}
    if "layers.0.weight" not in sd:
        raise ValueError(f"{source} is not an aesthetic/ImageReward MLP head: no 'layers.0.weight' "
                         f"(keys: {sorted(sd)[:4]}...)")
    head = MLPHead(sd["layers.0.weight"].shape[1])
    head.load_state_dict(sd, strict=True)
    return head


def default_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def default_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:  # bf16 halves the reward model's memory on GPU; CPU matmuls in bf16 are slow
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return weight_files.parse_dtype(dtype)


def _features(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _check_batch(images: torch.Tensor, prompts) -> list[str]:
    if images.ndim != 4:
        raise ValueError(f"images must be [B, 3, H, W]; got shape {tuple(images.shape)}")
    if prompts is None or isinstance(prompts, str) or len(prompts) != images.shape[0]:
        got = "a str" if isinstance(prompts, str) else (None if prompts is None else len(prompts))
        raise ValueError(f"need one prompt per image: {images.shape[0]} images, prompts={got}; pass a list of str")
    return list(prompts)


# ------------------------------------------------------------------------------------------------
# open_clip -> transformers CLIPModel conversion


def _count_layers(sd, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in sd if (m := pat.match(k))), default=-1)


def open_clip_to_hf(sd: dict[str, torch.Tensor], vision_heads: int, text_heads: int, layer_norm_eps: float = 1e-5):
    """Convert an open_clip (standard ``CLIP`` layout, GELU) state dict to (CLIPConfig, CLIPModel state dict).

    Head counts are not visible in the shapes, so they are arguments (ViT-H-14: 16 and 16). The text
    config gets ``eos_token_id=2``, which makes transformers pool at ``argmax(input_ids)``, exactly open_clip's
    ``text.argmax(-1)`` (the end-of-text token has the highest id).
    """
    from transformers import CLIPConfig

    sd = {k: v for k, v in sd.items() if k != "attn_mask" and not k.endswith(".attn_mask")}
    if "visual.conv1.weight" not in sd or "token_embedding.weight" not in sd:
        raise ValueError("not a standard open_clip CLIP state dict (needs visual.conv1.weight and "
                         "token_embedding.weight; timm towers / CustomTextCLIP are not supported)")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str, dst: str, transpose: bool = False):
        t = sd[src]
        out[dst] = t.t().contiguous() if transpose else t
        used.add(src)

    def blocks(src_prefix: str, dst_prefix: str, n: int):
        for i in range(n):
            s, d = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
            for name in ("weight", "bias"):
                q, k, v = sd[s + f"attn.in_proj_{name}"].chunk(3, dim=0)
                out[d + f"self_attn.q_proj.{name}"], out[d + f"self_attn.k_proj.{name}"] = q, k
                out[d + f"self_attn.v_proj.{name}"] = v
                used.add(s + f"attn.in_proj_{name}")
                for src, dst in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    take(f"{s}{src}.{name}", f"{d}{dst}.{name}")

    n_vis = _count_layers(sd, "visual.transformer.resblocks.")
    n_txt = _count_layers(sd, "transformer.resblocks.")
    blocks("visual.transformer.resblocks.", "vision_model.encoder.layers.", n_vis)
    blocks("transformer.resblocks.", "text_model.encoder.layers.", n_txt)
    take("visual.class_embedding", "vision_model.embeddings.class_embedding")
    take("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight")
    take("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight")
    take("visual.proj", "visual_projection.weight", transpose=True)
    take("token_embedding.weight", "text_model.embeddings.token_embedding.weight")
    take("positional_embedding", "text_model.embeddings.position_embedding.weight")
    take("text_projection", "text_projection.weight", transpose=True)
    take("logit_scale", "logit_scale")
    for name in ("weight", "bias"):
        take(f"visual.ln_pre.{name}", f"vision_model.pre_layrnorm.{name}")
        take(f"visual.ln_post.{name}", f"vision_model.post_layernorm.{name}")
        take(f"ln_final.{name}", f"text_model.final_layer_norm.{name}")
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"open_clip state dict has keys this converter does not map: {left[:5]} ({len(left)} in all)")

    conv = sd["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    t_width = sd["token_embedding.weight"].shape[1]
    config = CLIPConfig(
        projection_dim=sd["visual.proj"].shape[1],
        vision_config=dict(
            hidden_size=width, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=n_vis, num_attention_heads=vision_heads, image_size=grid * patch, patch_size=patch,
            hidden_act="gelu", layer_norm_eps=layer_norm_eps,
        ),
        text_config=dict(
            vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=t_width,
            intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], num_hidden_layers=n_txt,
            num_attention_heads=text_heads, max_position_embeddings=sd["positional_embedding"].shape[0],
            hidden_act="gelu", layer_norm_eps=layer_norm_eps, eos_token_id=2, bos_token_id=None, pad_token_id=None,
        ),
    )  # fmt: skip
    if width % vision_heads or t_width % text_heads:
        raise ValueError(f"head counts {vision_heads}/{text_heads} do not divide widths {width}/{t_width}")
    return config, out


def build_clip_from_state_dict(config, sd: dict[str, torch.Tensor]):
    """Instantiate a CLIPModel on the meta device (no random init of ~1B params) and assign ``sd``."""
    from transformers import CLIPModel

    with torch.device("meta"):
        model = CLIPModel(config)
    model.load_state_dict(sd, strict=True, assign=True)
    for module in model.modules():  # non-persistent position_ids buffers are not in any state dict
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name != "position_ids":
                    raise RuntimeError(f"buffer {name!r} was not loaded")
                module._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
    return model


# ------------------------------------------------------------------------------------------------
# Rewards


class _ClipReward(nn.Module):
    """Shared plumbing: frozen model on ``device`` in ``dtype``, torch preprocessing, fp32 scores."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device, crop_rounding: str,
                 resize_mode: str):
        super().__init__()
        # shared through weight_files.cached and kept out of the module tree, so a trainer's .to()/.train()/
        # state_dict() on the reward never touches (or checkpoints) the frozen model
        self.__dict__["model"] = model
        self.dtype, self.device = dtype, device
        self.crop_rounding, self.resize_mode = crop_rounding, resize_mode
        vcfg = model.config if not hasattr(model.config, "vision_config") else model.config.vision_config
        self.image_size = vcfg.image_size

    @classmethod
    def from_modules(cls, *modules, dtype: torch.dtype, device: torch.device):
        """The reward around modules built elsewhere, loading no weights: what ``__init__`` does after
        loading (``_wrap``). The memory planner wraps its meta-device towers with this."""
        reward = cls.__new__(cls)
        reward._wrap(*modules, dtype=dtype, device=device)
        return reward

    def to_device(self, device: torch.device) -> None:
        """Move the shared frozen model (and head) to ``device``; see ``rewards.place``."""
        self.model.to(device)
        if "head" in self.__dict__:
            self.head.to(device)
        self.device = device

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = clip_preprocess(images.to(self.device), self.image_size, crop_rounding=self.crop_rounding,
                            resize_mode=self.resize_mode)
        return x.to(self.dtype)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        feats = _features(self.model.get_image_features(pixel_values=self.pixels(images))).float()
        return feats / feats.norm(dim=-1, keepdim=True)  # out of place: keeps autograd intact


class _ClipImageText(_ClipReward):
    def __init__(self, model, tokenizer, scale: str, **kw):
        super().__init__(model, **kw)
        self.tokenizer = tokenizer
        self.scale = scale
        self.max_length = model.config.text_config.max_position_embeddings
        # prompt -> normalised text embedding: training prompt sets are small and repeat every epoch, and the
        # ViT-H text tower is 350M parameters. Bounded so an endless prompt stream cannot grow it forever.
        self._text_cache: dict[str, torch.Tensor] = {}
        self.text_cache_size = 8192

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        # no attention mask: open_clip and the CLIP reference attend causally over the padded sequence
        feats = _features(self.model.get_text_features(input_ids=tok.input_ids.to(self.device))).float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def to_device(self, device: torch.device) -> None:
        super().to_device(device)
        self._text_cache = {p: e.to(device) for p, e in self._text_cache.items()}

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            if len(self._text_cache) + len(missing) > self.text_cache_size:
                self._text_cache.clear()
            self._text_cache.update(zip(missing, self._encode_text(missing)))
        return torch.stack([self._text_cache[p] for p in prompts])

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        prompts = _check_batch(images, prompts)
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        if self.scale == "logit_scale":
            cos = cos * self.model.logit_scale.detach().float().exp()
        return cos.to(images.device)


def _finish(model: nn.Module, dtype, device, gradient_checkpointing: bool) -> nn.Module:
    model = weight_files.freeze(model.to(device=device, dtype=dtype))
    if gradient_checkpointing:
        weight_files.enable_checkpointing(model)
    return model


def _load_tokenizer(spec: str, option: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(weight_files.resolve_dir(spec, option)))


class PickScoreReward(_ClipImageText):
    """PickScore v1: ``logit_scale.exp() * cos``.

    Options: ``clip_path`` (CLIPModel folder or hub repo, default ``yuvalkirstain/PickScore_v1``),
    ``tokenizer_path`` (default the LAION ViT-H-14 repo), ``dtype`` (fp32|bf16|fp16; default bf16 on CUDA),
    ``device``, ``gradient_checkpointing``.
    """

    @staticmethod
    def weight_specs(args: dict) -> list[tuple[str, str, str]]:
        """(option, location, "file" | "dir") of the weights these options load (``rewards.missing_weights``)."""
        return [("clip_path", args["clip_path"], "dir"), ("tokenizer_path", args["tokenizer_path"], "dir")]

    def __init__(self, clip_path: str = "yuvalkirstain/PickScore_v1", tokenizer_path: str = LAION_H14,
                 dtype=None, device=None, gradient_checkpointing: bool = False):
        device = default_device(device)
        dtype = default_dtype(dtype, device)
        folder = weight_files.resolve_dir(clip_path, "clip_path")
        tok_folder = weight_files.resolve_dir(tokenizer_path, "tokenizer_path")

        def build():
            from transformers import AutoTokenizer, CLIPModel

            model = CLIPModel.from_pretrained(str(folder), dtype=dtype)
            return _finish(model, dtype, device, gradient_checkpointing), AutoTokenizer.from_pretrained(str(tok_folder))

        key = ("pickscore", str(folder), str(tok_folder), dtype, device, gradient_checkpointing)
        model, tok = weight_files.cached(key, build)
        self._wrap(model, tok, dtype=dtype, device=device)

    def _wrap(self, model, tok, dtype, device):
        # CLIPImageProcessor semantics: shortest side, floor-rounded centre crop
        super().__init__(model, tok, "logit_scale", dtype=dtype, device=device, crop_rounding="floor",
                         resize_mode="shortest")


class HPSv2Reward(_ClipImageText):
    """HPS v2 / v2.1: ``cos(img, txt)`` of the open_clip ViT-H-14 model fine-tuned by HPS.

    Options: ``version`` ("v2.1" default, or "v2.0") picks the default ``checkpoint_path`` in the hub repo
    ``xswu/HPSv2``; ``checkpoint_path`` (local .pt/.safetensors or ``owner/repo/file``), ``tokenizer_path``
    (default the LAION ViT-H-14 repo; only its tokenizer files are read), ``vision_heads``/``text_heads``
    (16/16 for ViT-H-14), ``resize_mode`` ("shortest" or "longest_pad"; equal on square images),
    ``dtype``, ``device``, ``gradient_checkpointing``.
    """

    @staticmethod
    def weight_specs(args: dict) -> list[tuple[str, str, str]]:
        checkpoint = args["checkpoint_path"] or HPS_CHECKPOINTS.get(args["version"], HPS_CHECKPOINTS["v2.1"])
        return [("checkpoint_path", checkpoint, "file"), ("tokenizer_path", args["tokenizer_path"], "dir")]

    def __init__(self, version: str = "v2.1", checkpoint_path: str | None = None, tokenizer_path: str = LAION_H14,
                 vision_heads: int = 16, text_heads: int = 16, resize_mode: str = "shortest", dtype=None,
                 device=None, gradient_checkpointing: bool = False):
        if version not in HPS_CHECKPOINTS:
            raise ValueError(f"HPS version {version!r} unknown; use one of {sorted(HPS_CHECKPOINTS)}")
        device = default_device(device)
        dtype = default_dtype(dtype, device)
        path = weight_files.resolve_file(checkpoint_path or HPS_CHECKPOINTS[version], "checkpoint_path")
        tok_folder = weight_files.resolve_dir(tokenizer_path, "tokenizer_path")

        def build():
            from transformers import AutoTokenizer

            config, sd = open_clip_to_hf(weight_files.load_state_dict(path), vision_heads, text_heads)
            model = build_clip_from_state_dict(config, sd)
            return _finish(model, dtype, device, gradient_checkpointing), AutoTokenizer.from_pretrained(str(tok_folder))

        key = ("hpsv2", str(path), str(tok_folder), vision_heads, text_heads, dtype, device, gradient_checkpointing)
        model, tok = weight_files.cached(key, build)
        self._wrap(model, tok, dtype=dtype, device=device, resize_mode=resize_mode)

    def _wrap(self, model, tok, dtype, device, resize_mode="shortest"):
        # open_clip's preprocess_val is torchvision: round-half-even centre crop
        super().__init__(model, tok, "none", dtype=dtype, device=device, crop_rounding="round",
                         resize_mode=resize_mode)


class AestheticReward(_ClipReward):
    """LAION aesthetic predictor v2: MLP head on the L2-normalised CLIP ViT-L/14 image embedding.

    Options: ``clip_path`` (CLIP folder/repo, default ``openai/clip-vit-large-patch14``; a full CLIPModel
    or a CLIPVisionModelWithProjection folder), ``head_path`` (.safetensors or .pth state dict with keys
    ``layers.*``; default ``trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth``, the head TRL's DDPO
    example uses), ``dtype``, ``device``, ``gradient_checkpointing``. Prompts are ignored.
    """

    @staticmethod
    def weight_specs(args: dict) -> list[tuple[str, str, str]]:
        return [("clip_path", args["clip_path"], "dir"), ("head_path", args["head_path"], "file")]

    def __init__(self, clip_path: str = "openai/clip-vit-large-patch14",
                 head_path: str = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth",
                 dtype=None, device=None, gradient_checkpointing: bool = False):
        device = default_device(device)
        dtype = default_dtype(dtype, device)
        folder = weight_files.resolve_dir(clip_path, "clip_path")
        head_file = weight_files.resolve_file(head_path, "head_path")

        def build():
            from transformers import AutoConfig, CLIPVisionModelWithProjection

            config = AutoConfig.from_pretrained(str(folder))
            if hasattr(config, "vision_config"):  # a full CLIPModel folder: load only its vision half
                vcfg = config.vision_config
                vcfg.projection_dim = config.projection_dim  # lives on the top-level config only
                config = vcfg
            vision = CLIPVisionModelWithProjection.from_pretrained(str(folder), config=config, dtype=dtype)
            head = load_head(weight_files.load_state_dict(head_file), str(head_file))
            if head.layers[0].in_features != vision.config.projection_dim:
                raise ValueError(f"head {head_file} takes {head.layers[0].in_features}-d embeddings but {folder} "
                                 f"projects to {vision.config.projection_dim}; use CLIP ViT-L/14 (768)")
            # the head stays fp32: it is tiny, and its output is compared across runs
            return _finish(vision, dtype, device, gradient_checkpointing), weight_files.freeze(head.to(device))

        key = ("aesthetic", str(folder), str(head_file), dtype, device, gradient_checkpointing)
        vision, head = weight_files.cached(key, build)
        self._wrap(vision, head, dtype=dtype, device=device)

    def _wrap(self, vision, head, dtype, device):
        super().__init__(vision, dtype=dtype, device=device, crop_rounding="floor", resize_mode="shortest")
        self.__dict__["head"] = head

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.model(pixel_values=self.pixels(images)).image_embeds.float()
        return feats / feats.norm(dim=-1, keepdim=True)

    def forward(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"images must be [B, 3, H, W]; got shape {tuple(images.shape)}")
        return self.head(self.image_embeds(images)).squeeze(-1).to(images.device)
