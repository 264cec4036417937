"""DDIM sampler: parity with diffusers' pipeline, the DRaFT-K gradient window, K drawn per batch."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from ril_fast import lora
from ril_fast.models import load_models
from ril_fast.models.text import PromptCache
from ril_fast.sampling import ddim_sample, decode, draw_window


@pytest.fixture(scope="module")
def sd(tiny_model_dirs):
    models = load_models(str(tiny_model_dirs["sd"]))
    layers = lora.inject_adapter_group(models.unet, "attn")
    lora.add_task(layers, rank=2, alpha=2.0, seed=0)
    with torch.no_grad():  # non-zero B so the adapter changes the output and gets a gradient
        for layer in layers:
            layer.lora_b[0].normal_(0, 0.1)
    return models, layers


def _cond(models, prompts):
    cache = PromptCache(models)
    return cache.get(prompts), cache.uncond(len(prompts))


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_no_grad_chain_matches_diffusers_pipeline(tiny_model_dirs, eta):
    """At eta > 0 (sampling.eta) the pipeline's seeded generator and ours draw the variance noise alike."""
    models = load_models(str(tiny_model_dirs["sd"]))
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dirs["sd"]), local_files_only=True)
    pipe.scheduler = models.scheduler.__class__.from_config(models.scheduler.config)
    prompts = ["a red circle", "a blue square"]
    z_T = torch.randn(2, models.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=4, guidance_scale=3.0, output_type="latent")
    ref = pipe(prompts, latents=z_T.clone(), eta=eta, generator=torch.Generator().manual_seed(5), **kw).images
    cond, uncond = _cond(models, prompts)
    ours = ddim_sample(models, cond, uncond, z_T, steps=4, guidance_scale=3.0, eta=eta, window=0,
                       generator=torch.Generator().manual_seed(5)).latents
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    if eta:  # the variance noise moved the chain: a sampler ignoring eta would fail above
        assert (ref - pipe(prompts, latents=z_T.clone(), eta=0.0, **kw).images).abs().max() > 1e-2


def _grads(layers):
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in lora.trainable_parameters(layers)])


def _reference_window_grad(models, layers, cond, uncond, z_T, steps, K, scale):
    """Brute force: an explicit loop, no checkpointing, prefix run under no_grad, window with grad."""
    sched = models.scheduler
    sched.set_timesteps(steps)
    x = z_T.clone()
    for i, t in enumerate(sched.timesteps):
        with torch.set_grad_enabled(i >= steps - K):
            both = uncond.cat(cond)
            out = models.unet(torch.cat([x, x]), t, encoder_hidden_states=both.prompt_embeds).sample
            u, c = out.chunk(2)
            x = sched.step(u + scale * (c - u), t, x).prev_sample
    for p in lora.trainable_parameters(layers):
        p.grad = None
    x.square().mean().backward()
    return _grads(layers)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_gradient_window_matches_brute_force(sd, K):
    models, layers = sd
    cond, uncond = _cond(models, ["a red circle"])
    z_T = torch.randn(1, models.latent_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = _reference_window_grad(models, layers, cond, uncond, z_T, 3, K, 2.0)
    for p in lora.trainable_parameters(layers):
        p.grad = None
    z = z_T.clone().requires_grad_(True)
    out = ddim_sample(models, cond, uncond, z, steps=3, guidance_scale=2.0, window=K, use_checkpoint=True)
    out.latents.square().mean().backward()
    torch.testing.assert_close(_grads(layers), ref, rtol=1e-4, atol=1e-7)
    assert ref.abs().sum() > 0
    # DRaFT-K detaches the latent entering the window: nothing reaches z_T unless K = N.
    assert (z.grad is not None and z.grad.abs().sum() > 0) == (K == 3)


def test_window_changes_the_gradient(sd):
    models, layers = sd
    cond, uncond = _cond(models, ["a red circle"])
    z_T = torch.randn(1, models.latent_channels, 8, 8, generator=torch.Generator().manual_seed(3))
    g1 = _reference_window_grad(models, layers, cond, uncond, z_T, 3, 1, 2.0)
    g3 = _reference_window_grad(models, layers, cond, uncond, z_T, 3, 3, 2.0)
    assert not torch.allclose(g1, g3)


def test_only_window_calls_record_grad(sd):
    models, layers = sd
    cond, uncond = _cond(models, ["a red circle"])
    calls = []
    hook = models.unet.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    try:
        z_T = torch.randn(1, models.latent_channels, 8, 8)
        ddim_sample(models, cond, uncond, z_T, steps=5, guidance_scale=2.0, window=2, use_checkpoint=False)
    finally:
        hook.remove()
    assert calls == [False, False, False, True, True]


def test_window_drawn_once_per_batch():
    gen = torch.Generator().manual_seed(0)
    draws = [draw_window(1, 4, gen) for _ in range(200)]
    assert set(draws) == {1, 2, 3, 4}
    assert draw_window(2, None, gen) == 2


def test_decode_checkpoint_and_slices_agree(sd):
    models, _ = sd
    z = torch.randn(2, models.latent_channels, 8, 8, requires_grad=True)
    a = decode(models, z)
    b = decode(models, z, use_checkpoint=True, slice_batch=True)
    torch.testing.assert_close(a, b)
    ga, = torch.autograd.grad(a.sum(), z)
    gb, = torch.autograd.grad(b.sum(), z)
    torch.testing.assert_close(ga, gb)
    assert a.min() >= 0 and a.max() <= 1


def test_eval_batches_are_dealt_to_ranks_and_gathered_in_order(tiny_model_dirs, monkeypatch):
    """sample_images with 2 ranks (collective simulated): rank r samples batches r, r+2, ...; the
    images gathered in rank order per round equal what one process samples."""
    from ril_fast import engine as eng
    from ril_fast.config import config_from_dict
    from ril_fast.evaluate import sample_images
    from ril_fast.step import latent_shape

    models = load_models(str(tiny_model_dirs["sd"]))
    prompts = ["a red cat", "a blue dog", "a green bird"]
    cfg = config_from_dict({"sampling": {"steps": 2, "guidance_scale": 3.0},
                            "eval": {"seeds": [0, 1], "batch_size": 2, "adherence": False},  # 6 pairs: 3 batches, 2 rounds
                            "tasks": [{"name": "t", "reward": "brightness", "train_prompts": prompts,
                                       "eval_prompts": prompts}]})
    cache = PromptCache(models)
    cache.warm(prompts + [""])
    shape = lambda n: latent_shape(models, cfg, n)  # noqa: E731
    single, pair_prompts = sample_images(models, cfg, cache, prompts, "cpu", shape)

    local = {}
    for r in (0, 1):
        sent = []
        monkeypatch.setattr(eng, "dist_ready", lambda: True)
        monkeypatch.setattr(eng, "world_size", lambda: 2)
        monkeypatch.setattr(eng, "rank", lambda r=r: r)
        monkeypatch.setattr(eng, "all_gather_objects", lambda obj: sent.append(obj) or [obj, obj])
        sample_images(models, cfg, cache, prompts, "cpu", shape)
        local[r] = sent
    assert [x is None for x in local[1]] == [False, True]  # round 2 has one batch: rank 1 idles
    gathered = torch.cat([img for rnd in zip(local[0], local[1]) for img in rnd if img is not None])
    assert torch.equal(gathered, single) and pair_prompts == [p for p in prompts for _ in (0, 1)]


def test_weight_dtype_agrees_with_diffusers(tiny_model_dirs):
    """The sampler's cheap dtype lookup gives what diffusers' ModelMixin.dtype gives (which walks
    every submodule per access), in fp32 and after a cast, for the UNet and the VAE."""
    from ril_fast.sampling import weight_dtype

    models = load_models(str(tiny_model_dirs["sd"]))
    lora.inject_adapter_group(models.unet, "attn")  # fp32 adapters on the model, as in training
    for module in (models.unet, models.vae):
        assert weight_dtype(module) == module.dtype == torch.float32
        module.to(torch.bfloat16)
        assert weight_dtype(module) == module.dtype == torch.bfloat16
