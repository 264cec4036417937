"""Model rewards (aesthetic, PickScore, HPSv2, ImageReward) on tiny random-weight models; nothing downloads.

References are independent of the code under test: transformers' own CLIP forward with its own
processor (PickScore), a hand-written open_clip-layout model (HPSv2 converter), the original tiny BLIP
modules run the ImageReward way (ImageReward converter), and plain torch for the aesthetic head.
"""

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ril_fast import rewards
from ril_fast.rewards import weight_files
from ril_fast.rewards.clip_rewards import MLPHead, open_clip_to_hf
from ril_fast.rewards.imagereward import IR_MEAN, IR_STD
from ril_fast.rewards.normalize import NormalizedReward
from ril_fast.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PROMPTS = ["a red cat", "two dogs on a hill", "a blue bird"]
PICKSCORE_BF16_ERR = 0.25  # PickScore in bf16 vs fp32 (x logit_scale 50): measured 0.115 on CPU


@pytest.fixture(autouse=True)
def _fresh_cache():
    weight_files.clear_cache()
    yield
    weight_files.clear_cache()


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    """A CLIP BPE tokenizer over single letters (no merges); end-of-text has the highest id, as in CLIP."""
    from transformers import CLIPTokenizer

    d = tmp_path_factory.mktemp("cliptok")
    vocab = {}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    out = d / "saved"
    tok.save_pretrained(str(out))
    return out, len(vocab)


def tiny_clip_config(vocab_size, projection_dim=16):
    from transformers import CLIPConfig

    return CLIPConfig(
        projection_dim=projection_dim,
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=24, eos_token_id=vocab_size - 1,
                         bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, clip_tokenizer_dir):
    from transformers import CLIPModel

    torch.manual_seed(1)
    model = CLIPModel(tiny_clip_config(clip_tokenizer_dir[1]))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))
    d = tmp_path_factory.mktemp("tinyclip")
    model.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    torch.manual_seed(2)
    head = MLPHead(16)
    d = tmp_path_factory.mktemp("head")
    torch.save(head.state_dict(), d / "head.pth")  # the improved-aesthetic-predictor format
    return d / "head.pth", head


def images(b=3, h=40, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def check_common(reward, imgs, prompts):
    """Finite [B] scores, gradient reaches every image, batch == singles."""
    x = imgs.clone().requires_grad_(True)
    r = reward(x, prompts)
    assert r.shape == (imgs.shape[0],) and r.dtype == torch.float32 and torch.isfinite(r).all()
    r.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()
    one = [None if prompts is None else prompts[i : i + 1] for i in range(len(imgs))]
    singles = torch.cat([reward(imgs[i : i + 1], one[i]) for i in range(len(imgs))])
    torch.testing.assert_close(reward(imgs, prompts), singles, atol=1e-5, rtol=1e-5)
    return r.detach()


# ---------------------------------------------------------------------------------------------- PickScore


def test_pickscore_matches_transformers_clip_with_its_processor(tiny_clip_dir, clip_tokenizer_dir):
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    reward = rewards.build("pickscore", clip_path=str(tiny_clip_dir), tokenizer_path=str(clip_tokenizer_dir[0]),
                           dtype="fp32", device="cpu")
    imgs = (images() * 255).round() / 255  # the processor works on uint8
    ours = check_common(reward, imgs, PROMPTS)

    model = CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(clip_tokenizer_dir[0]))
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    pils = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in imgs]
    pixel = torch.from_numpy(np.stack(proc(pils, return_tensors="np")["pixel_values"]))
    ids = tok(PROMPTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixel).logits_per_image.diagonal()
        # the same model fed our preprocessing: isolates the preprocessing difference
        ref_ours_pixels = model(input_ids=ids, pixel_values=clip_preprocess(imgs, 32)).logits_per_image.diagonal()
    torch.testing.assert_close(ours, ref_ours_pixels, atol=1e-4, rtol=1e-5)
    # processor parity is ~1/255 per pixel (PIL's uint8 rounding); through this random model that moves the
    # cosine by < 2e-3 (measured 1.1e-3), i.e. < 0.1 after logit_scale 50
    assert (ours - ref).abs().max() < 0.1, (ours, ref)


def test_pickscore_bf16_and_checkpointing(tiny_clip_dir, clip_tokenizer_dir):
    kw = dict(clip_path=str(tiny_clip_dir), tokenizer_path=str(clip_tokenizer_dir[0]), device="cpu")
    fp32 = rewards.build("pickscore", dtype="fp32", **kw)
    bf16 = rewards.build("pickscore", dtype="bf16", **kw)
    ckpt = rewards.build("pickscore", dtype="fp32", gradient_checkpointing=True, **kw)
    imgs = images()
    r32, r16 = fp32(imgs, PROMPTS), bf16(imgs, PROMPTS)
    assert r16.dtype == torch.float32 and torch.isfinite(r16).all()
    # bf16 against fp32 on the same images: measured 0.115 here (scores of order ±7); the bound is about 2x
    # that. Exactly 0 means bf16 never ran; a wrong cast or dtype path errs by the size of the scores.
    err = float((r32 - r16).abs().max())
    assert 0 < err < PICKSCORE_BF16_ERR, err
    # checkpointing recomputes layers in backward: same values and same image gradients
    x1, x2 = imgs.clone().requires_grad_(True), imgs.clone().requires_grad_(True)
    g1, = torch.autograd.grad(fp32(x1, PROMPTS).sum(), x1)
    n_ckpt = sum(getattr(m, "gradient_checkpointing", False) for m in ckpt.model.modules())
    assert n_ckpt == 4  # 2 vision + 2 text layers
    g2, = torch.autograd.grad(ckpt(x2, PROMPTS).sum(), x2)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)
    assert not any(p.requires_grad for p in fp32.model.parameters())


def test_model_is_loaded_once_and_frozen(tiny_clip_dir, clip_tokenizer_dir):
    kw = dict(clip_path=str(tiny_clip_dir), tokenizer_path=str(clip_tokenizer_dir[0]), dtype="fp32", device="cpu")
    a, b = rewards.build("pickscore", **kw), rewards.build("pickscore", **kw)
    assert a.model is b.model
    assert not a.model.training and all(not p.requires_grad for p in a.model.parameters())
    a.train()  # a trainer toggling modes must not switch the frozen model to training
    assert not a.model.training
    assert len(a.state_dict()) == 0  # the frozen model is not part of the reward's checkpoint
    # text embeddings are computed once per distinct prompt, and equal a fresh computation
    calls = []
    hook = a.model.text_model.register_forward_hook(lambda m, i, o: calls.append(i))
    a(images(), PROMPTS)
    a(images(), [PROMPTS[0], PROMPTS[0], "a new one"])
    hook.remove()
    assert len(calls) == 2
    torch.testing.assert_close(a.text_embeds(PROMPTS), a._encode_text(PROMPTS))
    with pytest.raises(ValueError, match="one prompt per image"):
        a(images(), PROMPTS[:2])


def test_place_moves_models_heads_and_text_cache(tiny_clip_dir, clip_tokenizer_dir, head_file):
    """rewards.place (memory.idle_rewards): the shared frozen model, the aesthetic head, the cached
    text embeddings and the device the reward preprocesses on all follow, through a normaliser too."""
    kw = dict(clip_path=str(tiny_clip_dir), dtype="fp32", device="cpu")
    pick = rewards.build("pickscore", tokenizer_path=str(clip_tokenizer_dir[0]), **kw)
    aest = rewards.build("aesthetic", head_path=str(head_file[0]), **kw)
    from ril_fast.rewards.normalize import NormalizedReward

    wrapped = NormalizedReward(aest, offset=0.0, scale=2.0)
    pick(images(), PROMPTS)  # fills the text cache
    rewards.place(pick, "meta")  # a second device (no data): every tensor must arrive there
    rewards.place(wrapped, "meta")
    assert pick.device == aest.device == torch.device("meta")
    moved = list(pick.model.parameters()) + list(aest.model.parameters()) + list(aest.head.parameters())
    assert {p.device.type for p in moved} == {"meta"}
    assert len(pick._text_cache) == len(PROMPTS)
    assert {e.device.type for e in pick._text_cache.values()} == {"meta"}
    rewards.place(lambda imgs, prompts: imgs.mean((1, 2, 3)), "meta")  # model-free: nothing to move
    weight_files.clear_cache()  # the cached models now live on meta


# ---------------------------------------------------------------------------------------------- aesthetic


def test_aesthetic_matches_plain_torch_reference(tiny_clip_dir, head_file):
    from transformers import CLIPModel

    path, head = head_file
    reward = rewards.build("aesthetic", clip_path=str(tiny_clip_dir), head_path=str(path), dtype="fp32", device="cpu")
    imgs = images()
    ours = check_common(reward, imgs, None)
    model = CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()
    with torch.no_grad():
        pix = clip_preprocess(imgs, 32)
        emb = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        ref = head.eval()(emb).squeeze(-1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_aesthetic_head_from_safetensors_and_wrong_head(tiny_clip_dir, head_file, tmp_path):
    from safetensors.torch import save_file

    path, head = head_file
    st = tmp_path / "head.safetensors"
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(st))
    a = rewards.build("aesthetic", clip_path=str(tiny_clip_dir), head_path=str(path), dtype="fp32", device="cpu")
    b = rewards.build("aesthetic", clip_path=str(tiny_clip_dir), head_path=str(st), dtype="fp32", device="cpu")
    torch.testing.assert_close(a(images(), None), b(images(), None))
    wrong = tmp_path / "wrong.pth"
    torch.save(MLPHead(768).state_dict(), wrong)
    with pytest.raises(ValueError, match="768-d embeddings"):
        rewards.build("aesthetic", clip_path=str(tiny_clip_dir), head_path=str(wrong), dtype="fp32", device="cpu")


def test_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(ValueError, match=r"hf download xswu/HPSv2 HPS_v2\.1_compressed\.pt"):
        rewards.build("hpsv2", device="cpu")
    with pytest.raises(ValueError, match=r"hf download openai/clip-vit-large-patch14`"):
        rewards.build("aesthetic", device="cpu")
    with pytest.raises(ValueError, match="head_path=.*no such file"):
        rewards.build("aesthetic", clip_path=str(tmp_path), head_path=str(tmp_path / "nope.pth"), device="cpu")
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        rewards.build("pickscore", dtype="fp8", device="cpu")


# ---------------------------------------------------------------------------------------------- HPSv2


class _ResBlock(nn.Module):
    """open_clip ResidualAttentionBlock (pre-LN, nn.MultiheadAttention, GELU MLP), names as in open_clip."""

    def __init__(self, w, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(w), nn.LayerNorm(w)
        self.attn = nn.MultiheadAttention(w, heads, batch_first=True)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(w, 4 * w), gelu=nn.GELU(), c_proj=nn.Linear(4 * w, w)))

    def forward(self, x, mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Tower(nn.Module):
    def __init__(self, w, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(_ResBlock(w, heads) for _ in range(layers))

    def forward(self, x, mask=None):
        for blk in self.resblocks:
            x = blk(x, mask)
        return x


class OpenClipRef(nn.Module):
    """Minimal open_clip ``CLIP`` (VisionTransformer + text transformer) with open_clip's parameter names."""

    def __init__(self, vocab, ctx=24, w=32, tw=48, layers=2, heads=2, patch=8, image=32, embed=16):
        super().__init__()
        g = image // patch
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, w, patch, patch, bias=False)
        self.visual.class_embedding = nn.Parameter(torch.randn(w))
        self.visual.positional_embedding = nn.Parameter(torch.randn(g * g + 1, w))
        self.visual.ln_pre, self.visual.ln_post = nn.LayerNorm(w), nn.LayerNorm(w)
        self.visual.transformer = _Tower(w, layers, heads)
        self.visual.proj = nn.Parameter(torch.randn(w, embed))
        self.token_embedding = nn.Embedding(vocab, tw)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, tw))
        self.transformer = _Tower(tw, layers, heads)
        self.ln_final = nn.LayerNorm(tw)
        self.text_projection = nn.Parameter(torch.randn(tw, embed))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("attn_mask", torch.full((ctx, ctx), float("-inf")).triu(1))  # old checkpoints carry it
        with torch.no_grad():  # random LayerNorm affine too, so a swapped ln mapping cannot pass
            for name, p in self.named_parameters():
                p.copy_(torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.5))
                if "ln" in name and name.endswith("weight"):
                    p.add_(1.0)

    def encode_image(self, x):
        v = self.visual
        x = v.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
        x = v.transformer(v.ln_pre(x))
        return v.ln_post(x[:, 0]) @ v.proj

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x, self.attn_mask))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def test_open_clip_converter_rejects_unknown_layouts():
    ref = OpenClipRef(vocab=20, tw=32)
    sd = dict(ref.state_dict())
    sd["visual.attn_pool.query"] = torch.zeros(1)
    with pytest.raises(ValueError, match="does not map"):
        open_clip_to_hf(sd, 2, 2)
    with pytest.raises(ValueError, match="not a standard open_clip"):
        open_clip_to_hf({"visual.trunk.x": torch.zeros(1)}, 2, 2)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_hpsv2_matches_open_clip_layout_reference(fmt, clip_tokenizer_dir, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tok_dir, vocab = clip_tokenizer_dir
    torch.manual_seed(3)
    ref = OpenClipRef(vocab=vocab).eval()
    if fmt == "pt":
        path = tmp_path / "hps.pt"
        torch.save({"state_dict": ref.state_dict()}, path)  # HPS checkpoints wrap the weights
    else:
        path = tmp_path / "hps.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    reward = rewards.build("hpsv2", checkpoint_path=str(path), tokenizer_path=str(tok_dir), vision_heads=2,
                           text_heads=2, dtype="fp32", device="cpu")
    imgs = images(h=45, w=35)  # odd crop offset: exercises torchvision's rounding
    ours = check_common(reward, imgs, PROMPTS)

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = tok(PROMPTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt").input_ids
    eot = ids.argmax(-1)
    ids_oc = torch.where(torch.arange(24)[None] > eot[:, None], 0, ids)  # open_clip pads with 0, not end-of-text
    with torch.no_grad():
        fi = ref.encode_image(clip_preprocess(imgs, 32, crop_rounding="round"))
        ft = ref.encode_text(ids_oc)
        expect = (fi / fi.norm(dim=-1, keepdim=True) * ft / ft.norm(dim=-1, keepdim=True)).sum(-1)
    torch.testing.assert_close(ours, expect, atol=1e-5, rtol=1e-4)
    assert ours.abs().max() <= 1.0 + 1e-6  # a cosine: HPS has no logit scale


# ---------------------------------------------------------------------------------------------- ImageReward


@pytest.fixture(scope="module")
def bert_tokenizer_dir(tmp_path_factory):
    from transformers import BertTokenizer

    d = tmp_path_factory.mktemp("berttok")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS, *[f"##{c}" for c in LETTERS]]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(d / "vocab.txt"))
    tok.save_pretrained(str(d / "saved"))
    return d / "saved", len(words)


def _blip_layout(vision, text, head):
    """The ImageReward.pt key layout (BLIP vit.py + med.py names), written out independently."""
    sd = {}
    inv = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
           "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for k, v in vision.state_dict().items():
        if k == "embeddings.class_embedding":
            sd["blip.visual_encoder.cls_token"] = v
        elif k == "embeddings.position_embedding":
            sd["blip.visual_encoder.pos_embed"] = v
        elif k.startswith("embeddings.patch_embedding."):
            sd["blip.visual_encoder.patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("post_layernorm."):
            sd["blip.visual_encoder.norm." + k.rsplit(".", 1)[1]] = v
        else:
            _, _, i, rest = k.split(".", 3)
            sub, kind = rest.rsplit(".", 1)
            sd[f"blip.visual_encoder.blocks.{i}.{inv[sub]}.{kind}"] = v
    for k, v in text.state_dict().items():
        sd["blip.text_encoder." + k] = v
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    for k, v in head.state_dict().items():
        sd["mlp." + k] = v
    return sd


def test_imagereward_matches_blip_reference(bert_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    tok_dir, vocab = bert_tokenizer_dir
    torch.manual_seed(4)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=1, image_size=32, patch_size=8,
                                              layer_norm_eps=1e-6)).eval()
    text = BlipTextModel(BlipTextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=1, encoder_hidden_size=64, max_position_embeddings=40,
                                        bos_token_id=None, sep_token_id=None, pad_token_id=0),
                         add_pooling_layer=False).eval()
    head = MLPHead(64).eval()
    path = tmp_path / "ImageReward.pt"
    torch.save(_blip_layout(vision, text, head), path)
    reward = rewards.build("imagereward", checkpoint_path=str(path), tokenizer_path=str(tok_dir), dtype="fp32",
                           device="cpu")
    imgs = images(h=45, w=35)
    ours = check_common(reward, imgs, PROMPTS)

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    t = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        emb = vision(pixel_values=clip_preprocess(imgs, 32, crop_rounding="round")).last_hidden_state
        out = text(input_ids=t.input_ids, attention_mask=t.attention_mask, encoder_hidden_states=emb,
                   encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long))
        expect = (head(out.last_hidden_state[:, 0]).squeeze(-1) - IR_MEAN) / IR_STD
    torch.testing.assert_close(ours, expect, atol=1e-5, rtol=1e-4)
    # the prompt matters (cross-attention path is live), and so does the image
    other = reward(imgs, ["zzz"] * 3)
    assert (other - ours).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------- normalisation


def test_normalized_reward_fixed_and_ema():
    raw = lambda x, p: x.mean(dim=(1, 2, 3)) * 10  # noqa: E731
    x = torch.rand(8, 3, 4, 4, requires_grad=True)
    fixed = NormalizedReward(raw, "fixed", offset=5.0, scale=2.0)
    r = fixed(x, None)
    torch.testing.assert_close(r, (raw(x, None) - 5) / 2)
    (g,) = torch.autograd.grad(r.sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 10 / 48 / 2))
    assert NormalizedReward(raw, "fixed", name="pickscore").offset == 21.0

    ema = NormalizedReward(raw, "ema", momentum=0.9)
    batches = [torch.rand(16, 3, 4, 4) for _ in range(5)]
    for b in batches:
        out = ema(b, None)
    # bias-corrected EMA of mean and second moment, computed by hand
    w = sum(0.1 * 0.9 ** (4 - i) for i in range(5))
    vals = [raw(b, None).double() for b in batches]
    m = sum(0.1 * 0.9 ** (4 - i) * v.mean() for i, v in enumerate(vals)) / w
    sq = sum(0.1 * 0.9 ** (4 - i) * (v * v).mean() for i, v in enumerate(vals)) / w
    mean, std = ema.running.stats()
    assert abs(mean - m.item()) < 1e-9 and abs(std - math.sqrt(sq.item() - m.item() ** 2 + 1e-6)) < 1e-9
    torch.testing.assert_close(out, ((vals[-1] - mean) / std).float())
    # checkpoint round trip; evaluation mode does not move the statistics
    clone = NormalizedReward(raw, "ema", momentum=0.9, update=False)
    clone.load_state_dict(ema.state_dict())
    clone(torch.rand(4, 3, 4, 4), None)
    assert clone.running.stats() == ema.running.stats()
    assert set(ema.state_dict()) == {"running.mean", "running.sq", "running.weight"}
    with pytest.raises(ValueError, match="offset and scale"):
        NormalizedReward(raw, "fixed")


def test_weights_resolve_from_local_hf_cache(tmp_path, monkeypatch, clip_tokenizer_dir):
    """`owner/repo/file` and `owner/repo` are found in the HF cache layout without any network."""
    import shutil

    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    snap = cache / "models--xswu--HPSv2" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (cache / "models--xswu--HPSv2" / "refs").mkdir()
    (cache / "models--xswu--HPSv2" / "refs" / "main").write_text("0123abcd")
    torch.save({"state_dict": OpenClipRef(vocab=clip_tokenizer_dir[1]).state_dict()}, snap / "HPS_v2.1_compressed.pt")
    tok_snap = cache / "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K" / "snapshots" / "feed"
    shutil.copytree(clip_tokenizer_dir[0], tok_snap)
    (tok_snap.parent.parent / "refs").mkdir()
    (tok_snap.parent.parent / "refs" / "main").write_text("feed")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))

    found = weight_files.resolve_file("xswu/HPSv2/HPS_v2.1_compressed.pt", "checkpoint_path")
    assert found == snap / "HPS_v2.1_compressed.pt"
    assert weight_files.resolve_dir("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "tokenizer_path") == tok_snap
    reward = rewards.build("hpsv2", vision_heads=2, text_heads=2, dtype="fp32", device="cpu")  # all defaults
    assert torch.isfinite(reward(images(), PROMPTS)).all()
    with pytest.raises(ValueError, match=r"hf download xswu/HPSv2 HPS_v2_compressed\.pt"):
        rewards.build("hpsv2", version="v2.0", device="cpu")
    with pytest.raises(ValueError, match="HPS version 'v3'"):
        rewards.build("hpsv2", version="v3")


@pytest.mark.gpu
def test_rewards_on_cuda_bf16(tiny_clip_dir, clip_tokenizer_dir, head_file):
    imgs = images().cuda().requires_grad_(True)
    pick = rewards.build("pickscore", clip_path=str(tiny_clip_dir), tokenizer_path=str(clip_tokenizer_dir[0]),
                         dtype="bf16", device="cuda", gradient_checkpointing=True)
    aes = rewards.build("aesthetic", clip_path=str(tiny_clip_dir), head_path=str(head_file[0]), dtype="bf16",
                        device="cuda")
    jpeg = rewards.build("jpeg_compressibility")
    total = pick(imgs, PROMPTS).sum() + aes(imgs, None).sum() + jpeg(imgs, PROMPTS).sum()
    total.backward()
    assert imgs.grad.is_cuda and torch.isfinite(imgs.grad).all()
    # the same images on CPU in fp32: bf16 on GPU stays within bf16 noise of the cosine
    cpu = rewards.build("pickscore", clip_path=str(tiny_clip_dir), tokenizer_path=str(clip_tokenizer_dir[0]),
                        dtype="fp32", device="cpu")
    ref = cpu(imgs.detach().cpu(), PROMPTS)
    assert (pick(imgs.detach(), PROMPTS).cpu() - ref).abs().max() < PICKSCORE_BF16_ERR
