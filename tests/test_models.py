"""Model loading, prompt encoding and the UNet call, checked against the diffusers pipelines themselves."""

import json

import pytest
import torch

from ril_fast.models import (
    PromptCache,
    build_tiny_pipeline,
    check_model_available,
    check_model_path,
    encode_prompts,
    free_text_encoders,
    load_models,
    save_tiny_pipeline,
    tiny_tokenizer,
    unet_forward,
)
from ril_fast.models.tiny import build_tiny_vocab, read_tiny_words

KINDS = ["sd", "sdxl"]
PROMPTS = ["a red circle on the left", "two small blue dogs", "a photo of a golden cat in the snow"]
H, W = 32, 48  # non-square, so a swapped height/width in the SDXL time ids shows
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # On the shared 2-core CI machines, 2 intra-op threads under load made each tiny UNet call 10-30x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=KINDS)
def saved(request, tmp_path_factory):
    """(kind, pipeline, Models loaded from the pipeline's saved folder, that folder)."""
    kind = request.param
    path = save_tiny_pipeline(tmp_path_factory.mktemp(kind) / "model", kind=kind, seed=3)
    pipe = build_tiny_pipeline(kind, seed=3)
    pipe.set_progress_bar_config(disable=True)
    return kind, pipe, load_models(path), path


def test_load_saved_folder(saved):
    kind, pipe, m, _ = saved
    assert m.kind == kind
    assert len(m.text_encoders) == len(m.tokenizers) == (1 if kind == "sd" else 2)
    assert type(m.scheduler).__name__ == "DDIMScheduler"
    assert m.scheduler.config.beta_schedule == pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert (m.sample_size, m.vae_scale_factor, m.latent_channels) == (32, 2, 4)
    assert m.prediction_type == "epsilon"
    assert m.vae_scaling_factor == pipe.vae.config.scaling_factor
    assert m.force_zeros_for_empty_prompt == (kind == "sdxl")
    # save -> load reproduces the weights the same seed builds
    last_te = pipe.text_encoder_2 if kind == "sdxl" else pipe.text_encoder
    for ours, ref in [(m.unet, pipe.unet), (m.vae, pipe.vae), (m.text_encoders[-1], last_te)]:
        ref_sd = ref.state_dict()
        for name, t in ours.state_dict().items():
            torch.testing.assert_close(t, ref_sd[name], rtol=0, atol=0, msg=name)
    for mod in [m.unet, m.vae, *m.text_encoders]:
        assert not mod.training
        assert not any(p.requires_grad for p in mod.parameters())


def test_load_dtype(saved):
    _, _, _, path = saved
    m = load_models(path, dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert m.unet.dtype == torch.bfloat16 and m.text_encoders[0].dtype == torch.bfloat16
    assert m.vae.dtype == torch.float32


def test_encode_prompts_equals_diffusers(saved):
    kind, pipe, m, _ = saved
    cond = encode_prompts(m, PROMPTS, H, W)
    out = pipe.encode_prompt(PROMPTS, device=CPU, num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert cond.prompt_embeds.shape == (3, 77, 32 if kind == "sd" else 80)
    torch.testing.assert_close(cond.prompt_embeds, out[0], rtol=0, atol=0)
    if kind == "sd":
        assert cond.pooled is None and cond.time_ids is None and cond.added_cond_kwargs() is None
        return
    torch.testing.assert_close(cond.pooled, out[2], rtol=0, atol=0)
    proj = pipe.text_encoder_2.config.projection_dim
    ref_ids = pipe._get_add_time_ids((H, W), (0, 0), (H, W), dtype=out[0].dtype, text_encoder_projection_dim=proj)
    torch.testing.assert_close(cond.time_ids, ref_ids.repeat(3, 1), rtol=0, atol=0)
    assert set(cond.added_cond_kwargs()) == {"text_embeds", "time_ids"}


def test_encode_long_prompt_and_attention_mask_equal_diffusers(saved):
    kind, pipe, m, _ = saved
    prompts = ["red " * 100, "a blue dog"]  # the first exceeds 77 tokens and is truncated
    encoders = [pipe.text_encoder, m.text_encoders[0]] if kind == "sd" else []
    try:
        for enc in encoders:  # SD2-style encoders that take the padding mask
            enc.config.use_attention_mask = True
        cond = encode_prompts(m, prompts, H, W)
        out = pipe.encode_prompt(prompts, device=CPU, num_images_per_prompt=1, do_classifier_free_guidance=False)
    finally:
        for enc in encoders:
            enc.config.use_attention_mask = False
    torch.testing.assert_close(cond.prompt_embeds, out[0], rtol=0, atol=0)
    if kind == "sd":  # the mask does change the padded positions, so the comparison above is not vacuous
        assert not torch.allclose(cond.prompt_embeds[1], encode_prompts(m, prompts, H, W).prompt_embeds[1])


def test_uncond_equals_diffusers_negative(saved):
    kind, pipe, m, _ = saved
    out = pipe.encode_prompt(PROMPTS[:2], device=CPU, num_images_per_prompt=1, do_classifier_free_guidance=True)
    unc = PromptCache(m).uncond(2)
    torch.testing.assert_close(unc.prompt_embeds, out[1], rtol=0, atol=0)
    if kind == "sdxl":  # force_zeros_for_empty_prompt: zeros, not the encoded ""
        assert unc.prompt_embeds.abs().sum() == 0
        torch.testing.assert_close(unc.pooled, out[3], rtol=0, atol=0)


@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=lambda g: f"cfg={g}")
def test_sampling_loop_reproduces_pipeline(saved, guidance):
    """Our encode + PromptCache.uncond + unet_forward + DDIM step loop gives the pipeline's own latents."""
    kind, pipe, m, _ = saved
    prompts = PROMPTS[:2]
    lat0 = torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(1))
    ref = pipe(prompts, height=H, width=W, num_inference_steps=2, guidance_scale=guidance, latents=lat0.clone(),
               output_type="latent").images  # fmt: skip
    cache = PromptCache(m, height=H, width=W)
    cond = cache.get(prompts)
    if guidance > 1:
        cond = cache.uncond(2).cat(cond)
    m.scheduler.set_timesteps(2)
    lat = lat0.clone()
    with torch.no_grad():
        for t in m.scheduler.timesteps:
            x = torch.cat([lat] * 2) if guidance > 1 else lat
            out = unet_forward(m, m.scheduler.scale_model_input(x, t), t, cond)
            if guidance > 1:
                unc, txt = out.chunk(2)
                out = unc + guidance * (txt - unc)
            lat = m.scheduler.step(out, t, lat).prev_sample
    torch.testing.assert_close(lat, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lat, lat0)


def test_unet_forward_equals_direct_call(saved):
    kind, _, m, _ = saved
    cond = encode_prompts(m, PROMPTS[:2], H, W)
    x = torch.randn(2, 4, H // 2, W // 2)
    t = torch.tensor([10, 500])
    extra = {} if kind == "sd" else {"added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": cond.time_ids}}
    ref = m.unet(x, t, encoder_hidden_states=cond.prompt_embeds, **extra).sample
    torch.testing.assert_close(unet_forward(m, x, t, cond), ref, rtol=0, atol=0)
    if kind == "sdxl":  # the time ids reach the UNet: another image size changes the output
        other = encode_prompts(m, PROMPTS[:2], 64, 64)
        assert not torch.allclose(unet_forward(m, x, t, other), ref)


def test_pipeline_runs_with_tiny_tokenizer(saved):
    _, pipe, _, _ = saved
    img = pipe("a red circle", num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


def test_prompt_cache_encodes_each_prompt_once(saved):
    kind, _, m, _ = saved
    calls = []
    hooks = [enc.register_forward_hook(lambda mod, a, o: calls.append(a[0].shape[0])) for enc in m.text_encoders]
    try:
        cache = PromptCache(m, height=H, width=W)
        c1 = cache.get([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
        assert calls == [2] * len(m.text_encoders)  # one batch of the 2 unique prompts per encoder
        c2 = cache.get([PROMPTS[1], PROMPTS[0]])
        assert len(calls) == len(m.text_encoders)  # all cached: no encoder call
        cache.get([PROMPTS[2]])
        assert calls[-1] == 1 and len(calls) == 2 * len(m.text_encoders)
        assert cache.encoder_calls == 2
    finally:
        for h in hooks:
            h.remove()
    ref = encode_prompts(m, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], H, W)
    torch.testing.assert_close(c1.prompt_embeds, ref.prompt_embeds)
    torch.testing.assert_close(c2.prompt_embeds, ref.index(slice(0, 2)).prompt_embeds.flip(0))
    if kind == "sdxl":
        torch.testing.assert_close(c1.pooled, ref.pooled)
        torch.testing.assert_close(c1.time_ids, ref.time_ids)


def test_conditioning_batch_ops(saved):
    kind, _, m, _ = saved
    a = encode_prompts(m, PROMPTS[:2], H, W)
    r = a.repeat(2)
    assert len(r) == 4
    torch.testing.assert_close(r.index([0, 2]).prompt_embeds, a.prompt_embeds[[0, 1]])
    torch.testing.assert_close(r.index(1).prompt_embeds, a.prompt_embeds[:1])
    c = a.cat(a.index(slice(1, 2)))
    assert len(c) == 3 and torch.equal(c.prompt_embeds[2], a.prompt_embeds[1])
    h = a.to(dtype=torch.float16)
    assert h.prompt_embeds.dtype == torch.float16
    if kind == "sdxl":
        assert h.pooled.dtype == h.time_ids.dtype == torch.float16
        assert len(c.pooled) == len(c.time_ids) == 3


def test_free_text_encoders(saved):
    m = load_models(saved[3])
    cache = PromptCache(m)
    cache.warm(PROMPTS)
    with pytest.raises(ValueError, match="keep_text_encoders"):
        free_text_encoders(m, "gpu")
    free_text_encoders(m, "cpu")
    assert all(next(e.parameters()).device.type == "cpu" for e in m.text_encoders)
    free_text_encoders(m, "free")
    assert m.text_encoders == []
    assert len(cache.get(PROMPTS[::-1])) == 3  # cached prompts still work
    with pytest.raises(RuntimeError, match="freed"):
        cache.get(["an uncached prompt"])


def test_check_model_path_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "nope")
    msg = check_model_path(missing)
    assert msg and "not found" in msg and missing in msg and "model_index.json" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="not found"):
        load_models(missing)
    assert "no model_index.json" in check_model_path(str(tmp_path))
    assert check_model_path("nobody-owns-this/no-such-model-xyz") is None  # well-formed; loadable is another question
    offline = check_model_available("nobody-owns-this/no-such-model-xyz")
    assert "not in the local HF cache" in offline and "hf download nobody-owns-this/no-such-model-xyz" in offline
    path = save_tiny_pipeline(tmp_path / "m", kind="sd")
    assert check_model_path(path) is None
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    (tmp_path / "m" / "unet").rename(tmp_path / "m" / "unet_gone")
    assert "unet" in check_model_path(path)


def test_tiny_vocab_words_are_single_tokens():
    tok = tiny_tokenizer()
    words = read_tiny_words()
    ids = tok(words).input_ids
    assert all(len(i) == 3 for i in ids)  # <|startoftext|> word <|endoftext|>
    assert len({i[1] for i in ids}) == len(set(words))
    assert tok.decode(tok("A Red  circle, two dogs").input_ids, skip_special_tokens=True) == "a red circle , two dogs"
    # the shipped files are what the generator makes from words.txt
    vocab, merges = build_tiny_vocab(words)
    assert vocab == tok.get_vocab() and len(vocab) == len(tok)
    # an unknown word falls back to pieces instead of the unknown token
    assert tok.unk_token_id not in tok("zzyzx").input_ids[1:-1]
