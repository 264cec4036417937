"""Build the embedded default text-to-image model and its prompt-adherence classifier.

Trains, from scratch and seeded, on the procedural shapes data (``ril_fast.data.shapes``):
  1. an ``AutoencoderKL`` (32x32 RGB -> 8x8x4 latent),
  2. a ``UNet2DConditionModel`` (epsilon prediction, cross-attention) jointly with a small
     ``CLIPTextModel`` behind a word-level ``CLIPTokenizer``, with 10% empty-prompt dropout for CFG,
  3. a shape/colour/background classifier (``ril_fast.rewards.adherence.ShapeClassifier``),
then saves a diffusers ``StableDiffusionPipeline`` folder + ``classifier/`` under
``ril_fast/assets/embedded/`` and measures prompt adherence on held-out prompt x seed pairs
(``quality.json``, ``docs/embedded_samples.png``).

    OMP_NUM_THREADS=1 python scripts/build_embedded.py            # full build, ~40 min on one core
    python scripts/build_embedded.py --scale 0.02 --out /tmp/emb  # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ril_fast.data import shapes  # noqa: E402
from ril_fast.rewards.adherence import HEADS, ShapeClassifier, adherence_accuracy, save_classifier  # noqa: E402

MAX_TOKENS = 12  # bos + at most 8 caption words + eos, padded


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- components


def make_tokenizer(folder: Path):
    """Word-level CLIP BPE: every caption word is one token. BPE only emits a whole word if merges
    build it, so merges.txt spells each word out letter by letter (longest words first)."""
    from transformers import CLIPTokenizer

    words = shapes.vocabulary()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in words:
        vocab[w + "</w>"] = len(vocab)
    merges = []
    for w in sorted(words, key=len, reverse=True):
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        for p in pieces:
            vocab.setdefault(p, len(vocab))
        cur = pieces[0]
        for p in pieces[1:]:
            if f"{cur} {p}" not in merges:
                merges.append(f"{cur} {p}")
            cur += p
            vocab.setdefault(cur, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                        model_max_length=MAX_TOKENS)
    for w in words:
        if tok.tokenize(w) != [w + "</w>"]:
            raise RuntimeError(f"tokenizer splits {w!r} into {tok.tokenize(w)}; the merges are wrong")
    return tok


def make_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=32)
    return CLIPTextModel(cfg)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=shapes.RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=16,
    )


def make_scheduler():
    from diffusers import DDIMScheduler

    # Linear betas to 0.02 (DDPM): at t=999 almost no signal is left (alpha_bar ~ 4e-5), so pure
    # noise at sampling time matches training even for 8x8 latents, where the SD schedule would
    # leak the mean colour. "trailing" spacing makes 25 steps start at t=999. At t=999 an error in
    # eps is amplified ~150x in the x0 estimate; clipping x0 to +-4 (latents have unit std) took
    # colour adherence from 77% to 97% at CFG 3 in a sweep over the built model.
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                         clip_sample=True, clip_sample_range=4.0, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                         timestep_spacing="trailing")


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


class Schedule:
    """Warmup + cosine learning rate over whichever runs out first: ``steps`` or ``budget_s`` seconds.

    The CPU is shared, so a wall-clock cap keeps the build inside its time box; the step at which
    a stage stopped is logged and written to quality.json (with no cap the build is step-exact).
    """

    def __init__(self, steps: int, budget_s: float, peak: float, warmup: int):
        self.steps, self.budget_s, self.peak, self.warmup, self.t0 = steps, budget_s, peak, warmup, time.time()

    def progress(self, step: int) -> float:
        return max(step / self.steps, (time.time() - self.t0) / self.budget_s if self.budget_s > 0 else 0.0)

    def lr(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        return self.peak * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, self.progress(step))))


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)


# ----------------------------------------------------------------------------- training stages


def train_vae(images: torch.Tensor, steps: int, budget_s: float, batch: int, seed: int):
    torch.manual_seed(seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0, sched, step = time.time(), Schedule(steps, budget_s, 2e-3, 50), 0
    while sched.progress(step) < 1:
        for pg in opt.param_groups:
            pg["lr"] = sched.lr(step)
        x = images[torch.randint(len(images), (batch,), generator=g)] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"vae step {step}/{steps} mse {F.mse_loss(rec, x).item():.5f} kl {kl.item():.3f} "
                f"({time.time() - t0:.0f}s)")
        step += 1
    log(f"vae stopped at step {step}")
    return vae.eval().requires_grad_(False), step


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(images[i:i + batch] * 2 - 1).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(lat_mean, lat_std, captions, tokenizer, scale: float, steps: int, budget_s: float, batch: int,
               seed: int, init=None, peak_lr: float = 1e-3):
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    unet, text = init if init is not None else (make_unet(), make_text_encoder(len(tokenizer)))
    unet.train().requires_grad_(True)
    text.train().requires_grad_(True)
    noise_sched = DDPMScheduler.from_config(make_scheduler().config)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=peak_lr, weight_decay=0.01)
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(seed)
    t0, running, sched, step = time.time(), 0.0, Schedule(steps, budget_s, peak_lr, 100), 0
    while sched.progress(step) < 1:
        lr = sched.lr(step)
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.randint(len(lat_mean), (batch,), generator=g)
        z = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * scale
        tok = ids[idx].clone()
        drop = torch.rand(batch, generator=g) < 0.1  # classifier-free guidance dropout
        tok[drop] = empty
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        zt = noise_sched.add_noise(z, noise, t)
        cond = text(tok)[0]
        loss = F.mse_loss(unet(zt, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.995, (1 + step) / (10 + step))  # short run: a 0.999 EMA would lag
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text, decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0:
            log(f"unet step {step}/{steps} loss {running:.4f} lr {lr:.2e} ({time.time() - t0:.0f}s)")
        step += 1
    log(f"unet stopped at step {step}")
    return ema_unet.eval(), ema_text.eval(), step


def train_classifier(images, labels, vae, steps: int, budget_s: float, batch: int, seed: int):
    """Half of each batch is VAE reconstructions, plus noise/blur, so decoder artefacts are not
    mistaken for a different class."""
    torch.manual_seed(seed)
    clf = ShapeClassifier(width=16)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    n_rec = min(len(images), 2048)  # reconstructions computed once: the VAE is the costly part
    with torch.no_grad():
        recs = torch.cat([((vae.decode(vae.encode(images[i:i + 128] * 2 - 1).latent_dist.mean).sample + 1) / 2)
                          .clamp(0, 1) for i in range(0, n_rec, 128)])
    t0, sched, step = time.time(), Schedule(steps, budget_s, 2e-3, 50), 0
    while sched.progress(step) < 1:
        for pg in opt.param_groups:
            pg["lr"] = sched.lr(step)
        idx = torch.randint(len(images), (batch,), generator=g)
        x, y = images[idx].clone(), labels[idx]
        half = batch // 2
        ridx = torch.randint(n_rec, (half,), generator=g)
        x[:half], y = recs[ridx], torch.cat([labels[ridx], y[half:]])
        blur = torch.rand(batch, generator=g) < 0.3
        x[blur] = F.avg_pool2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), 3, 1)
        x = (x + 0.03 * torch.rand(batch, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)).clamp(0, 1)
        logits = clf(x)
        loss = sum(F.cross_entropy(logits[h], y[:, i]) for i, h in enumerate(HEADS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"classifier step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        step += 1
    log(f"classifier stopped at step {step}")
    return clf.eval().requires_grad_(False), step


# ----------------------------------------------------------------------------- evaluation


def save_grid(images: torch.Tensor, titles: list[str], path: Path, cols: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.7 * rows))
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=6)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(folder: Path, clf: ShapeClassifier, seeds_per_prompt: int, guidances: list[float], grid: Path | None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    prompts = shapes.all_prompts()
    # Held-out noise seeds: sampling seeds from 10_000 up are used nowhere in training.
    pairs = [(p, 10_000 + 97 * k + i) for i, p in enumerate(prompts) for k in range(seeds_per_prompt)]
    result = {"prompts": len(prompts), "seeds_per_prompt": seeds_per_prompt, "steps": 25, "by_guidance": {}}
    for gs in guidances:
        imgs = []
        for i in range(0, len(pairs), 88):
            chunk = pairs[i:i + 88]
            gens = [torch.Generator().manual_seed(s) for _, s in chunk]
            out = pipe([p for p, _ in chunk], num_inference_steps=25, guidance_scale=gs, generator=gens,
                       output_type="pt").images
            imgs.append(out)
        imgs = torch.cat(imgs)
        acc = adherence_accuracy(imgs, [p for p, _ in pairs], clf)
        result["by_guidance"][str(gs)] = acc
        log(f"guidance {gs}: {acc}")
        if grid is not None and gs == guidances[0]:
            sel = list(range(0, len(pairs), max(1, len(pairs) // 32)))[:32]
            titles = [pairs[i][0].replace(" background", "").replace("a ", "", 1) for i in sel]
            save_grid(imgs[sel], titles, grid, cols=8)
    return result


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "ril_fast" / "assets" / "embedded"))
    ap.add_argument("--grid", default=str(ROOT / "docs" / "embedded_samples.png"))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count and budget (smoke: 0.01)")
    ap.add_argument("--n-images", type=int, default=16_000)
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--vae-budget-min", type=float, default=10.0)
    ap.add_argument("--unet-steps", type=int, default=6000)
    ap.add_argument("--unet-budget-min", type=float, default=27.0)
    ap.add_argument("--clf-steps", type=int, default=800)
    ap.add_argument("--clf-budget-min", type=float, default=2.5)
    ap.add_argument("--guidance", type=float, nargs="+", default=[5.0])
    ap.add_argument("--seeds-per-prompt", type=int, default=2)
    ap.add_argument("--eval-only", action="store_true", help="only re-measure quality of the folder at --out")
    ap.add_argument("--resume", action="store_true",
                    help="continue training the UNet + text encoder of the folder at --out (VAE, classifier kept)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak UNet learning rate")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    s = lambda n: max(2, int(n * args.scale))  # noqa: E731
    out, times = Path(args.out), {}
    if args.eval_only:
        from ril_fast.rewards.adherence import load_classifier

        gen = evaluate(out, load_classifier(out / "classifier"), args.seeds_per_prompt, args.guidance,
                       Path(args.grid))
        q = json.loads((out / "quality.json").read_text())
        q["generation"]["by_guidance"].update(gen["by_guidance"])
        tmp = out / "quality.json.tmp"
        tmp.write_text(json.dumps(q, indent=2))
        os.replace(tmp, out / "quality.json")
        return
    from diffusers import StableDiffusionPipeline

    t = time.time()
    n_img = max(512, int(args.n_images * min(1.0, args.scale * 5)))
    chunks = [shapes.sample(2000, seed=args.seed * 1000 + i) for i in range(math.ceil(n_img / 2000))]
    images = torch.cat([c[0] for c in chunks])[:n_img]
    labels = torch.cat([c[1] for c in chunks])[:n_img]
    captions = sum((c[2] for c in chunks), [])[:n_img]
    times["data_s"] = time.time() - t
    log(f"data: {len(images)} images in {times['data_s']:.0f}s")

    prev = json.loads((out / "quality.json").read_text()) if args.resume else None
    if args.resume:  # keep the VAE, tokenizer and classifier; continue the UNet + text encoder
        from ril_fast.rewards.adherence import load_classifier

        old = StableDiffusionPipeline.from_pretrained(str(out))
        vae, init = old.vae, (old.unet, old.text_encoder)
        clf, times, vae_steps, clf_steps = load_classifier(out / "classifier"), dict(prev["wall_s"]), \
            prev["steps_done"]["vae"], prev["steps_done"]["classifier"]
    else:
        t, init = time.time(), None
        vae, vae_steps = train_vae(images, s(args.vae_steps), 60 * args.vae_budget_min * args.scale, 16, args.seed)
        times["vae_s"] = time.time() - t
    t = time.time()
    lat_mean, lat_std = encode(vae, images)
    scale = vae.config.scaling_factor if args.resume else 1.0 / lat_mean.std().item()
    vae.register_to_config(scaling_factor=scale)
    times["encode_s"] = time.time() - t
    log(f"latents {tuple(lat_mean.shape)}, scaling_factor {scale:.4f}, mean posterior std {lat_std.mean():.4f}")

    stage = out.with_name(out.name + ".building")
    shutil.rmtree(stage, ignore_errors=True)
    tokenizer = make_tokenizer(stage / "tokenizer")
    t = time.time()
    unet, text, unet_steps = train_unet(lat_mean, lat_std, captions, tokenizer, scale, s(args.unet_steps),
                                        60 * args.unet_budget_min * args.scale, 32, args.seed + int(args.resume),
                                        init=init, peak_lr=args.lr)
    if args.resume:
        times["unet_text_resumed_s"] = time.time() - t
        unet_steps = prev["steps_done"]["unet"] + unet_steps if isinstance(prev["steps_done"]["unet"], int) else \
            unet_steps
    else:
        times["unet_text_s"] = time.time() - t
        t = time.time()
        clf, clf_steps = train_classifier(images, labels, vae, s(args.clf_steps),
                                          60 * args.clf_budget_min * args.scale, 64, args.seed)
        times["classifier_s"] = time.time() - t

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(stage), safe_serialization=True)
    save_classifier(clf, stage / "classifier")

    # Classifier accuracy on fresh eval-split images, raw and through the VAE.
    test_x, test_y, test_c = shapes.sample(1000, seed=args.seed, split="eval")
    real_acc = adherence_accuracy(test_x, test_c, clf)
    with torch.no_grad():
        rec = ((vae.decode(vae.encode(test_x * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
    rec_acc = adherence_accuracy(rec, test_c, clf)
    log(f"classifier on real eval images {real_acc}; on VAE reconstructions {rec_acc}")

    t = time.time()
    gen = evaluate(stage, clf, args.seeds_per_prompt, args.guidance, Path(args.grid))
    times["eval_s"] = time.time() - t
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20 for p in stage.iterdir()
             if p.is_dir()}
    quality = {
        "generation": gen,
        "classifier_accuracy_real": real_acc,
        "classifier_accuracy_vae_reconstruction": rec_acc,
        "vae_reconstruction_mse": F.mse_loss(rec, test_x).item(),
        "params": {"vae": n_params(vae), "unet": n_params(unet), "text_encoder": n_params(text),
                   "classifier": n_params(clf)},
        "steps_done": {"vae": vae_steps, "unet": unet_steps, "classifier": clf_steps},
        "size_mb": {**sizes, "total": sum(sizes.values())},
        "wall_s": times,
        "threads": torch.get_num_threads(),
        "args": vars(args),
    }
    (stage / "quality.json").write_text(json.dumps(quality, indent=2))
    # Swap the finished folder in at the end so a crash never leaves a half-written model.
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)
    log(f"done: {json.dumps(quality['size_mb'])} MB, times {json.dumps(times)}")


if __name__ == "__main__":
    main()
