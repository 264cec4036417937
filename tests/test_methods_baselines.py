"""The reviewer's baselines (lwf, l2, kl_base, joint, independent), λ in ε units, and the teachers,
each against an oracle that does not go through the code under test."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from ril_fast import kernels, lora
from ril_fast.lora.group import LoRAGroupLinear, init_lora_a
from ril_fast.methods import distill as D
from ril_fast.methods.teacher import l2_penalty, reset_ema, teacher_mode
from ril_fast.models import load_models
from ril_fast.rewards import build
from ril_fast.rewards.normalize import JointReward, Normalizer
from ril_fast.sampling import ddim_sample, decode, guided_output
from ril_fast.step import compute_loss, make_batch
from tests.tiny_models import TRAIN_PROMPTS, rid_config

PROMPTS = TRAIN_PROMPTS


@pytest.fixture(scope="module")
def setup(rid_group, tiny_model_dirs):
    """``rid_group`` (tests/conftest.py) and the base UNet without any adapter: an independent oracle."""
    return (*rid_group, load_models(str(tiny_model_dirs[rid_group[0]])).unet)


_DRAWS = itertools.count(100)


def _perturb(layers, std=0.2):
    """Set the trainable pair to a fresh state: A at a PEFT-style init plus noise, B noise (a new draw on every
    call, so two calls never give equal values, and the weights never accumulate across the module's tests)."""
    gen = torch.Generator().manual_seed(next(_DRAWS))
    with torch.no_grad():
        for layer in layers:
            a, b = layer.trainable_pair()
            a.copy_(init_lora_a(a.shape[0], a.shape[1], gen, "kaiming") + torch.randn(a.shape, generator=gen) * std)
            b.copy_(torch.randn(b.shape, generator=gen) * std)


def _merged_unet(plain, layers, newest):
    """A plain UNet whose weights are W + Σ s_i B_i A_i, the newest pair given: an oracle of the adapter
    group's function built by weight merging, not by LoRAGroupLinear's forward."""
    unet = copy.deepcopy(plain)
    with torch.no_grad():
        for layer in layers:
            weight = unet.get_submodule(layer.name).weight
            pairs = [(layer.lora_a[i], layer.lora_b[i]) for i in range(layer.num_tasks - 1)] + [newest(layer)]
            for (a, b), s in zip(pairs, layer.scales):
                weight += s * (b.float() @ a.float())
    return unet


def _oracle_out(models, unet, x, t, cond, uncond):
    swapped = copy.copy(models)
    swapped.unet = unet
    return guided_output(swapped, x, t, cond, uncond, 2.0)


@pytest.mark.parametrize("teacher", ["ema", "previous", "base"])
def test_teacher_is_the_model_it_claims(setup, tiny_model_dirs, teacher):
    kind, models, layers, cache, plain = setup
    reset_ema(layers)
    _perturb(layers)  # the student moves away from its copy taken at reset_ema
    cfg = rid_config(tiny_model_dirs[kind])
    batch = make_batch(models, cfg, cache, PROMPTS, 1, 0, "cpu")
    x = batch.z_T
    t = int(models.scheduler.config.num_train_timesteps) // 2
    with torch.no_grad():
        with teacher_mode(layers, teacher):
            got = guided_output(models, x, t, batch.cond, batch.uncond, 2.0)
        if teacher == "base":
            oracle = plain
        else:
            oracle = _merged_unet(plain, layers, lambda layer: layer.ema_pair())
        want = _oracle_out(models, oracle, x, t, batch.cond, batch.uncond)
        student = guided_output(models, x, t, batch.cond, batch.uncond, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (student - want).abs().max() > 1e-3  # the student is not the teacher: the check can fail
    assert all(not layer.use_teacher and layer.active_tasks is None for layer in layers)  # state restored


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("target", ["x0", "eps", "image"])
def test_identical_teacher_gives_exact_zero_loss_and_gradient(setup, tiny_model_dirs, target, eta):
    kind, models, layers, cache, _ = setup
    _perturb(layers)
    reset_ema(layers)  # teacher = student, bit for bit
    cfg = rid_config(tiny_model_dirs[kind], sampling={"eta": eta})
    batch = make_batch(models, cfg, cache, PROMPTS, 1, 1, "cpu")
    gen = torch.Generator().manual_seed(5) if eta else None
    sample = ddim_sample(models, batch.cond, batch.uncond, batch.z_T, steps=3, guidance_scale=2.0, eta=eta,
                         window=1, generator=gen)
    images = decode(models, sample.latents)
    loss = D.last_step_loss(models, layers, sample, batch.cond, batch.uncond, 2.0, target, student_images=images,
                            eta=eta)
    assert float(loss) == 0.0
    params = lora.trainable_parameters(layers)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)
    _perturb(layers)  # a different student gives a positive loss for the same target: the check can fail
    sample = ddim_sample(models, batch.cond, batch.uncond, batch.z_T, steps=3, guidance_scale=2.0, eta=eta,
                         window=1, generator=torch.Generator().manual_seed(5) if eta else None)
    images = decode(models, sample.latents)
    moved = D.last_step_loss(models, layers, sample, batch.cond, batch.uncond, 2.0, target, student_images=images,
                             eta=eta)
    assert float(moved) > 0


def _schedulers():
    """The three schedulers the configs use, as their DDIM configs give them."""
    sd = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    embedded = DDIMScheduler.from_pretrained("ril_fast/assets/embedded", subfolder="scheduler")
    return {"embedded (trailing)": (embedded, 10), "sd15 (leading)": (DDIMScheduler(**sd), 20),
            "sdxl (leading)": (DDIMScheduler(**sd), 20)}


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_lambda_means_the_same_on_every_scheduler(ptype):
    """The same ε disagreement gives the same loss (its analytic MSE) on every model's last step, whatever the
    prediction type; the unweighted x0 loss differs by c² = (1 − ᾱ)/ᾱ, 0.115 against 1.7e-3 (67×)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    eps_s, eps_t = torch.randn(2, 3, 4, 8, 8, generator=g)
    want = float(((eps_s - eps_t) ** 2).mean())
    c2 = {}
    for name, (sched, steps) in _schedulers().items():
        sched.set_timesteps(steps)
        t = int(sched.timesteps[-1])
        ab = sched.alphas_cumprod[t].float().expand(3)
        a = ab.view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps_s  # the student's own input

        def output(eps):  # the model output that predicts ε at x_t, in this prediction type
            x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
            return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0_hat, "sample": x0_hat}[ptype]

        loss = kernels.distill_mse(output(eps_s), output(eps_t), x_t, ab, ptype, weight=D.eps_units(ab))
        assert float(loss) == pytest.approx(want, rel=2e-3), name
        # _eps inverts each prediction type (the MSE below cannot tell: a wrong x_t term cancels between two
        # outputs at the same x_t). fp32 round trip: measured at most 4.9e-6 (sample prediction at SD's t = 1,
        # divided by √(1 − ᾱ) = 0.04); bound 5e-5, while a wrong term errs by ~1
        torch.testing.assert_close(D._eps(output(eps_s), x_t, ab, ptype), eps_s, rtol=0, atol=5e-5)
        eps_loss = F.mse_loss(D._eps(output(eps_s), x_t, ab, ptype), D._eps(output(eps_t), x_t, ab, ptype))
        assert float(eps_loss) == pytest.approx(want, rel=2e-3), name
        unweighted = kernels.distill_mse(output(eps_s), output(eps_t), x_t, ab, ptype)
        c2[name] = float(unweighted) / want
    assert c2["embedded (trailing)"] == pytest.approx(0.115, rel=0.02)
    assert c2["sd15 (leading)"] == pytest.approx(1.7e-3, rel=0.02)
    assert c2["embedded (trailing)"] / c2["sd15 (leading)"] == pytest.approx(67, rel=0.03)


def test_l2_penalty_equals_the_formed_weight_difference():
    torch.manual_seed(0)
    layers = [LoRAGroupLinear(torch.nn.Linear(d_in, d_out), name=f"l{i}") for i, (d_in, d_out) in
              enumerate([(12, 20), (7, 5)])]
    lora.add_task(layers, 3, 6.0, seed=0)
    with torch.no_grad():
        for layer in layers:
            layer.lora_b[0].normal_()
    reset_ema(layers)  # the anchor B0 A0 is non-zero
    _perturb(layers, std=0.5)
    want = sum(((layer.scales[-1] * (layer.lora_b[0] @ layer.lora_a[0] - layer.ema_b @ layer.ema_a)) ** 2).sum()
               for layer in layers) / len(layers)
    got = l2_penalty(layers)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    reset_ema(layers)
    assert float(l2_penalty(layers)) == pytest.approx(0.0, abs=1e-9)


def test_reinit_newest_draws_what_add_task_draws():
    base = torch.nn.Linear(16, 8)
    fresh = LoRAGroupLinear(copy.deepcopy(base))
    fresh.add_task(4, 4.0, generator=torch.Generator().manual_seed(7))
    trained = LoRAGroupLinear(copy.deepcopy(base))
    lora.add_task([trained], 4, 4.0, seed=1)
    with torch.no_grad():
        trained.lora_b[0].normal_()
    lora.reinit_newest([trained], seed=7)
    torch.testing.assert_close(trained.lora_a[0], fresh.lora_a[0], rtol=0, atol=0)
    assert float(trained.lora_b[0].abs().max()) == 0.0
    torch.testing.assert_close(trained.ema_a, fresh.lora_a[0], rtol=0, atol=0)


def test_l2_method_adds_the_penalty_to_the_loss(setup, tiny_model_dirs):
    kind, models, layers, cache, _ = setup
    reset_ema(layers)
    _perturb(layers)
    cfg = rid_config(tiny_model_dirs[kind], name="l2", l2_weight=3.0, reward_weight=0.5)
    batch = make_batch(models, cfg, cache, PROMPTS, 1, 2, "cpu")
    out = compute_loss(models, layers, build("brightness"), batch, cfg, use_distill=False)
    penalty = float(l2_penalty(layers))
    assert penalty > 0
    assert float(out.loss) == pytest.approx(-0.5 * float(out.reward.mean()) + 3.0 * penalty, rel=1e-5)


def test_reward_normalisation_enters_the_loss(setup, tiny_model_dirs):
    kind, models, layers, cache, _ = setup
    cfg = rid_config(tiny_model_dirs[kind], name="group", reward_weight=2.0)
    batch = make_batch(models, cfg, cache, PROMPTS, 1, 3, "cpu")
    out = compute_loss(models, layers, build("brightness"), batch, cfg, use_distill=False,
                       reward_norm=Normalizer(offset=0.25, scale=0.05))
    assert float(out.loss) == pytest.approx(-2.0 * float(((out.reward - 0.25) / 0.05).mean()), rel=1e-5)


def test_joint_reward_sums_the_normalised_rewards():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    r1, r2 = build("brightness"), build("contrast")
    joint = JointReward([r1, r2], [Normalizer(0.5, 0.1), None])
    want = (r1(images, [""] * 3) - 0.5) / 0.1 + r2(images, [""] * 3)
    torch.testing.assert_close(joint(images, [""] * 3), want)


def test_running_normaliser_state_round_trips():
    a = Normalizer(running_momentum=0.9)
    for seed in range(3):
        a(torch.randn(4, generator=torch.Generator().manual_seed(seed)) * 3 + 1)
    b = Normalizer(running_momentum=0.9)
    b.load_state(a.state())
    x = torch.tensor([0.0, 2.0])
    torch.testing.assert_close(b(x.clone()), a(x.clone()))
    mean, std = a.running.stats()
    assert std > 0.5 and abs(mean) < 5


def test_renoised_distillation_matches_its_definition(setup, tiny_model_dirs):
    """Re-noised variant: zero for an identical teacher; otherwise the ε MSE at the drawn timestep, rebuilt
    here from the scheduler's add_noise and the merged-weight oracle of the teacher."""
    kind, models, layers, cache, plain = setup
    _perturb(layers)
    reset_ema(layers)
    cfg = rid_config(tiny_model_dirs[kind])
    batch = make_batch(models, cfg, cache, PROMPTS, 1, 4, "cpu")
    sample = ddim_sample(models, batch.cond, batch.uncond, batch.z_T, steps=3, guidance_scale=2.0, window=1)
    kw = dict(teacher="ema", seed=11, use_checkpoint=True)
    assert float(D.renoised_loss(models, layers, sample, batch.cond, batch.uncond, 2.0, **kw)) == 0.0
    _perturb(layers)
    loss = D.renoised_loss(models, layers, sample, batch.cond, batch.uncond, 2.0, **kw)
    gen = torch.Generator().manual_seed(11)
    timesteps = models.scheduler.timesteps
    t = timesteps[int(torch.randint(len(timesteps), (1,), generator=gen))]
    noise = torch.randn(sample.latents.shape, generator=gen)
    z = models.scheduler.add_noise(sample.latents.detach(), noise, t.view(1))
    with torch.no_grad():
        student = guided_output(models, z, int(t), batch.cond, batch.uncond, 2.0)
        teacher = _oracle_out(models, _merged_unet(plain, layers, lambda layer: layer.ema_pair()), z, int(t),
                              batch.cond, batch.uncond)
    want = F.mse_loss(student, teacher)  # epsilon-prediction models: the outputs are ε
    assert float(loss) == pytest.approx(float(want), rel=1e-3)
    assert float(loss) > 0
    grads = torch.autograd.grad(loss, lora.trainable_parameters(layers), allow_unused=True)
    assert any(g is not None and float(g.abs().max()) > 0 for g in grads)


def _ema_teacher(models, plain, layers):
    """The EMA teacher built without teacher_mode: a plain UNet holding the merged EMA weights."""
    swapped = copy.copy(models)
    swapped.unet = _merged_unet(plain, layers, lambda layer: layer.ema_pair())
    return swapped


@pytest.mark.parametrize("target,eta", [("eps", 0.0), ("image", 0.7)])
def test_last_step_target_against_the_merged_teacher(setup, tiny_model_dirs, target, eta):
    """``eps``: the ε MSE against the teacher's output at the student's z_1 (ε-prediction models: the
    outputs themselves). ``image`` at eta > 0: the teacher's last DDIM step replayed with the student's
    variance noise (redrawn here from the seed: 3 steps draw 3 noises, the last is z_1's), decoded."""
    kind, models, layers, cache, plain = setup
    assert models.prediction_type == "epsilon"
    reset_ema(layers)
    _perturb(layers)
    cfg = rid_config(tiny_model_dirs[kind])
    batch = make_batch(models, cfg, cache, PROMPTS, 1, 6, "cpu")
    with torch.no_grad():
        sample = ddim_sample(models, batch.cond, batch.uncond, batch.z_T, steps=3, guidance_scale=2.0, eta=eta,
                             window=1, generator=torch.Generator().manual_seed(5))
        images = decode(models, sample.latents)
        loss = D.last_step_loss(models, layers, sample, batch.cond, batch.uncond, 2.0, target, student_images=images,
                                eta=eta)
        last = sample.last
        teacher_out = guided_output(_ema_teacher(models, plain, layers), last.x_t, last.t, batch.cond, batch.uncond,
                                    2.0)
        if target == "eps":
            want = F.mse_loss(last.out, teacher_out)
        else:
            gen = torch.Generator().manual_seed(5)
            noise = [torch.randn(batch.z_T.shape, generator=gen) for _ in range(3)][-1]
            sched = DDIMScheduler.from_config(models.scheduler.config)
            sched.set_timesteps(3)
            prev = sched.step(teacher_out, last.t, last.x_t, eta=eta, variance_noise=noise).prev_sample
            want = F.mse_loss(images, decode(models, prev))
    # merged weights against the group's forward: ~1e-6 relative per output, far below rel 1e-3
    assert float(loss) == pytest.approx(float(want), rel=1e-3)
    assert float(want) > 0


def _brute_force_full_chain(models, plain, layers, batch, steps, window, eta, seed):
    """Full-step distillation by hand: two explicit DDIM loops (student and EMA teacher as merged-weight
    UNets, diffusers drawing the variance noise from generators seeded alike), x0 from the scheduler's own
    ``pred_original_sample``, ᾱ/(1 − ᾱ)·MSE(x0) per window step, averaged over the window."""
    student = copy.copy(models)
    student.unet = _merged_unet(plain, layers, lambda layer: layer.trainable_pair())
    x0s = {}
    for who, m in (("student", student), ("teacher", _ema_teacher(models, plain, layers))):
        sched = DDIMScheduler.from_config(models.scheduler.config)
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed)
        x = batch.z_T.clone()
        for t in sched.timesteps:
            out = guided_output(m, x, int(t), batch.cond, batch.uncond, 2.0)
            step = sched.step(out, t, x, eta=eta, generator=gen)
            x0s.setdefault(who, []).append(step.pred_original_sample)
            x = step.prev_sample
    abar = sched.alphas_cumprod[sched.timesteps].float()
    terms = [abar[i] / (1 - abar[i]) * F.mse_loss(x0s["student"][i], x0s["teacher"][i])
             for i in range(steps - window, steps)]
    return sum(terms) / window


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_full_chain_matches_a_brute_force_loop(setup, tiny_model_dirs, eta):
    """Value, averaging over the window and (eta > 0) the shared variance noise of full-step distillation."""
    kind, models, layers, cache, plain = setup
    reset_ema(layers)
    _perturb(layers)
    cfg = rid_config(tiny_model_dirs[kind], distill_mode="full")
    batch = make_batch(models, cfg, cache, PROMPTS[:1], 1, 7, "cpu")
    with torch.no_grad():
        sample = ddim_sample(models, batch.cond, batch.uncond, batch.z_T, steps=3, guidance_scale=2.0, eta=eta,
                             window=2, record_window=True, generator=torch.Generator().manual_seed(5))
        loss = D.full_chain_loss(models, layers, sample, batch.z_T, batch.cond, batch.uncond, steps=3,
                                 guidance_scale=2.0, eta=eta, generator_seed=5)
        want = _brute_force_full_chain(models, plain, layers, batch, 3, 2, eta, 5)
    assert float(loss) == pytest.approx(float(want), rel=1e-3)  # merged weights: ~1e-6 relative per output
    assert float(want) > 0
