"""Meta-tensor memory planner: "will this config fit on N GiB?" without a GPU or any weights.

    python -m ril_fast.memory --config configs/sdxl.json [--json] [--set k=v ...]

Exit status 1 when the plan exceeds ``memory.budget_gib`` (``--json`` then says ``"fits": false``).

The configured models are built on the ``meta`` device from their architecture configs (the model
folder's own configs when ``model.path`` is a local diffusers folder, else the shipped
``ril_fast/models/arch/{sd15,sdxl}_*.json``: a hub id containing "xl" maps to SDXL, anything else
to SD1.5). Then ONE whole training step runs on meta tensors (shapes and dtypes, no data: about
ten times faster than ``FakeTensorMode``, which this planner used before), through the trainer's own code: ``compute_loss`` (no-grad sampling prefix, checkpointed grad window,
teacher last-step forward, VAE decode with grad, reward), ``Engine`` backward, the optimizer step
and ``ema_update``. :class:`MemoryTracker` adds the bytes of every new output storage and
subtracts them when the storage is freed, so the peak is what the allocator would be asked for.

The evaluation after each task is planned too (:func:`plan_eval`: one no-grad ``eval.batch_size``
batch through ``sample_images``, then one reward scoring a task's images), and the budget check
holds both peaks.

Not modelled: CUDA context (~0.5 GiB), allocator caching/fragmentation, cuBLAS/cuDNN workspaces,
the fused Triton/CUDA LoRA kernels' own saved tensors (the torch reference path is traced),
DeepSpeed's bucket buffers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ril_fast import rewards
from ril_fast.memory_tracker import MemoryTracker, materialize, tag_module  # noqa: F401 (public names)
from ril_fast.methods.teacher import ema_update, reset_ema

GIB = 2**30
ARCH_DIR = Path(__file__).resolve().parent / "models" / "arch"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Architecture


def _read(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def memory_arch(model_path: str) -> str:
    """``sdxl`` or ``sd15`` for a model path without local configs (hub id): "xl" in the name -> SDXL."""
    return "sdxl" if "xl" in Path(model_path).name.lower() or "xl" in model_path.lower() else "sd15"


@dataclass
class Arch:
    kind: str  # "sd" or "sdxl" (as Models.kind)
    unet: dict
    vae: dict
    text_encoders: list[tuple[str, dict]]  # (class name, config)
    scheduler: dict
    source: str
    force_zeros_for_empty_prompt: bool = False


def resolve_arch(model_path: str) -> Arch:
    """Architecture configs: the local folder's when present, else the shipped SD1.5 / SDXL ones."""
    p = Path(model_path).expanduser()
    if (p / "unet" / "config.json").is_file():
        index = json.loads((p / "model_index.json").read_text())
        unet = _read(p / "unet" / "config.json")
        kind = "sdxl" if (index.get("text_encoder_2") and index["text_encoder_2"][0]) or \
            unet.get("addition_embed_type") == "text_time" else "sd"
        encoders = []
        for name in ("text_encoder", "text_encoder_2"):
            if index.get(name) and index[name][0] and (p / name / "config.json").is_file():
                cls = "CLIPTextModelWithProjection" if kind == "sdxl" and name == "text_encoder_2" else "CLIPTextModel"
                encoders.append((cls, _read(p / name / "config.json")))
        return Arch(kind, unet, _read(p / "vae" / "config.json"), encoders,
                    _read(p / "scheduler" / "scheduler_config.json"), str(p),
                    bool(index.get("force_zeros_for_empty_prompt", kind == "sdxl")))
    name = memory_arch(model_path)
    files = {k: ARCH_DIR / f"{name}_{k}.json" for k in ("unet", "vae", "scheduler", "text_encoder", "text_encoder_2")}
    encoders = [("CLIPTextModel", _read(files["text_encoder"]))]
    if name == "sdxl":
        encoders.append(("CLIPTextModelWithProjection", _read(files["text_encoder_2"])))
    return Arch("sdxl" if name == "sdxl" else "sd", _read(files["unet"]), _read(files["vae"]), encoders,
                _read(files["scheduler"]), f"ril_fast/models/arch/{name}_*.json", name == "sdxl")


def build_meta_models(arch: Arch, dtype: torch.dtype):
    """``Models`` with every weight on the meta device, as ``load_models`` would build them."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as dlog

    from ril_fast.models.sd import Models

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to(dtype)
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(arch.unet).to(dtype)
            vae = AutoencoderKL.from_config(arch.vae).to(dtype)
    finally:
        dlog.set_verbosity(level)
    for m in (unet, vae):
        m.requires_grad_(False)
        m.eval()
    scheduler = DDIMScheduler.from_config(arch.scheduler)
    return Models.assemble(arch.kind, unet, vae, [], [], scheduler, arch.force_zeros_for_empty_prompt, arch.source)


def text_encoder_bytes(arch: Arch, dtype: torch.dtype) -> int:
    import transformers

    total = 0
    for cls, config in arch.text_encoders:
        conf = transformers.CLIPTextConfig(**config)
        with torch.device("meta"):
            model = getattr(transformers, cls)(conf)
        total += sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    return total


def _unet_tag(mod, name, is_param):
    from ril_fast.lora.group import LoRAGroupLinear

    if isinstance(mod, LoRAGroupLinear):
        return "adapters"  # the EMA copies (ema_a / ema_b buffers)
    if isinstance(mod, nn.ParameterList):
        return "adapters"
    return "weights_unet"


class _FakeTokenizer:
    """Stands in for the reward's tokenizer: only the shapes of ``input_ids`` / ``attention_mask`` matter."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, prompts, **_):
        from types import SimpleNamespace

        ids = torch.zeros(len(prompts), self.length, dtype=torch.long)
        return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))


def build_reward(name: str, options: dict, device: torch.device = torch.device("cpu")):
    """(reward, modules): the reward ``name`` with its tower built on meta from the arch JSONs.

    Model rewards are their own classes around the meta tower (``from_modules``: preprocess, tower,
    head / text cosine, as the trainer runs them); model-free rewards are the registered ones
    themselves (no modules). ``materialize`` the modules inside the tracker. ``device``: where the
    reward sends the images (meta for a meta trace).
    """
    from ril_fast.rewards import clip_rewards as cr
    from ril_fast.rewards.weight_files import enable_checkpointing, parse_dtype

    if name not in rewards.TOWERS:
        return rewards.build(name, **options), None
    import transformers

    dtype = parse_dtype(options.get("dtype") or "float32")
    ckpt = bool(options.get("gradient_checkpointing", False))
    if name == "imagereward":
        return _build_imagereward(dtype, ckpt, device)
    config = _read(ARCH_DIR / f"{rewards.TOWERS[name]}.json")
    with torch.device("meta"):
        if "vision_config" in config:
            model = transformers.CLIPModel(transformers.CLIPConfig(**config))
        else:
            model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**config))
    model = model.to(dtype).requires_grad_(False).eval()
    if ckpt:
        enable_checkpointing(model)
    reward_cls = rewards.factory(name)
    if name == "aesthetic":
        with torch.device("meta"):
            head = cr.MLPHead(model.config.projection_dim).requires_grad_(False).eval()  # fp32, as the trainer
        reward = reward_cls.from_modules(model, head, dtype=dtype, device=device)
        return reward, [model, head]
    tokenizer = _FakeTokenizer(model.config.text_config.max_position_embeddings)
    return reward_cls.from_modules(model, tokenizer, dtype=dtype, device=device), [model]


def _reward_key(cfg, task) -> str:
    return json.dumps([task.reward, rewards.build_options(task, cfg.memory)], sort_keys=True, default=str)


def _build_rewards(cfg, tasks, device: torch.device) -> dict[str, tuple]:
    """One (reward, modules) per distinct reward + options among ``tasks``, as ``rewards.weight_files``
    shares identical reward models in the trainer."""
    built: dict[str, tuple] = {}
    for t in tasks:
        key = _reward_key(cfg, t)
        if key not in built:
            built[key] = build_reward(t.reward, rewards.build_options(t, cfg.memory), device)
    return built


def _build_imagereward(dtype, ckpt: bool, device: torch.device):
    """ImageReward as the reward class runs it (BLIP ViT-L/16, BERT with cross-attention, fp32 MLP
    head), built on meta from ``imagereward_blip.json``."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from ril_fast.rewards import clip_rewards as cr
    from ril_fast.rewards import imagereward as ir
    from ril_fast.rewards.weight_files import enable_checkpointing

    config = _read(ARCH_DIR / f"{rewards.TOWERS['imagereward']}.json")
    with torch.device("meta"):
        vision = BlipVisionModel(BlipVisionConfig(**config["vision_config"]))
        text = BlipTextModel(BlipTextConfig(**config["text_config"]), add_pooling_layer=False)
        head = cr.MLPHead(config["text_config"]["hidden_size"])
    for tower in (vision, text):
        tower.to(dtype).requires_grad_(False).eval()
        if ckpt:
            enable_checkpointing(tower)
    model = ir.ImageRewardModel(vision, text, head.requires_grad_(False).eval())
    reward = ir.ImageRewardReward.from_modules(model, _FakeTokenizer(ir.MAX_LENGTH), dtype=dtype, device=device)
    return reward, [model]


class _FakePromptCache:
    """``PromptCache`` stand-in: same entry shapes/dtypes, one entry per unique prompt of the run."""

    def __init__(self, models, arch: Arch, dtype, n_unique: int, height: int, width: int):
        self.models, self.dtype = models, dtype
        self.width_d = sum(c["hidden_size"] for _, c in arch.text_encoders)
        self.length = arch.text_encoders[0][1].get("max_position_embeddings", 77)
        self.pooled_d = arch.text_encoders[-1][1].get("projection_dim") if arch.kind == "sdxl" else None
        self.hw = (height, width)
        self._cache = {}
        self.n_unique = n_unique

    def _entry(self, prompt: str):
        from ril_fast.models.text import Conditioning

        if prompt not in self._cache:
            embeds = torch.zeros(1, self.length, self.width_d, dtype=self.dtype)
            if self.pooled_d is None:
                self._cache[prompt] = Conditioning(embeds)
            else:
                h, w = self.hw
                ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype)
                self._cache[prompt] = Conditioning(embeds, torch.zeros(1, self.pooled_d, dtype=self.dtype), ids)
        return self._cache[prompt]

    def fill(self, prompts: list[str]) -> None:
        for p in prompts:
            self._entry(p)

    def get(self, prompts):
        from ril_fast.models.text import cat_conditionings

        return cat_conditionings([self._entry(p) for p in prompts])

    def uncond(self, batch: int):
        from dataclasses import replace

        if self.models.force_zeros_for_empty_prompt and self.models.kind == "sdxl":
            key = "\0zeros"
            if key not in self._cache:
                empty = self._entry("")
                self._cache[key] = replace(empty, prompt_embeds=torch.zeros_like(empty.prompt_embeds),
                                           pooled=torch.zeros_like(empty.pooled))
            return self._cache[key].repeat(batch)
        return self.get([""]).repeat(batch)


def all_prompts(cfg) -> list[str]:
    """Every prompt the trainer caches (train + eval of every task, the negative prompt)."""
    from ril_fast.config import read_prompts

    out = set()
    for i, t in enumerate(cfg.tasks):
        out |= set(read_prompts(t.train_prompts, f"tasks.{i}.train_prompts"))
        out |= set(read_prompts(t.eval_prompts, f"tasks.{i}.eval_prompts"))
    return sorted(out | {cfg.sampling.negative_prompt})


def _adamw8bit_state(params, tracker: MemoryTracker) -> list[torch.Tensor]:
    """bitsandbytes AdamW8bit state (its C kernels cannot run on meta tensors): per tensor of
    >= 4096 elements two uint8 moments + fp32 absmax per 256-block + two 256-entry fp32 qmaps;
    smaller tensors keep two fp32 moments."""
    state = []
    tracker.push("optimizer_state")
    for p in params:
        n = p.numel()
        if n >= 4096:
            blocks = (n + 255) // 256
            state += [torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
                      torch.zeros(blocks), torch.zeros(blocks), torch.zeros(256), torch.zeros(256)]
        else:
            state += [torch.zeros(n), torch.zeros(n)]
        state.append(torch.zeros(1))  # step
    tracker.pop()
    return state


def optimizer_offloaded(cfg) -> bool:
    return cfg.deepspeed.zero_stage >= 1 and cfg.deepspeed.offload_optimizer


@dataclass
class StepPlan:
    task: int
    peak_bytes: int
    breakdown: dict[str, int]  # live bytes per tag at the peak
    static_bytes: int  # live before the step (weights, adapters, rewards, cache)
    cpu_bytes: int  # what ZeRO offload keeps on the host (optimizer state + fp32 grads)
    resident: dict[str, int] = field(default_factory=dict)  # live bytes per tag after the step


def _real_timesteps(scheduler) -> None:
    """The sampler calls ``int(t)`` on the scheduler's timesteps, which a meta tensor cannot answer
    (the trace makes meta the default device): compute them on the CPU and hold them as Python ints."""
    original = scheduler.set_timesteps

    def set_timesteps(num_inference_steps, device=None):
        with torch.device("cpu"):
            original(num_inference_steps)
            scheduler.timesteps = [int(t) for t in scheduler.timesteps]

    scheduler.set_timesteps = set_timesteps


def traced_config(cfg):
    """``cfg`` with the no-grad sampling prefix cut to one step (last-step distillation only).

    Prefix steps run without grad and keep nothing but the latent, so each one has the same
    transient peak: tracing one of them gives the same plan as tracing all, in far less time.
    Full-step distillation records every teacher step, so it is traced at its real length.
    """
    import copy

    if cfg.method.distill and cfg.method.distill_mode == "full":
        return cfg
    k = cfg.sampling.grad_window_max or cfg.sampling.grad_window
    out = copy.deepcopy(cfg)
    out.sampling.steps = min(cfg.sampling.steps, k + 1)
    return out


def _materialize_models(cfg, arch: Arch, dtype, models, layers, tracker: MemoryTracker) -> list:
    """UNet, VAE and adapters (EMA reset, as begin_task) as tensors inside ``tracker``, their forwards
    tagged; the text encoders' bytes when they stay on the device. Returns what must stay alive."""
    materialize(models.unet, tracker, _unet_tag)
    materialize(models.vae, tracker, lambda *_: "weights_vae")
    tracker.push("adapters")
    reset_ema(layers)  # the teacher starts as the current model
    tracker.pop()
    tag_module(models.unet, tracker, "activations_unet")
    tag_module(models.vae.decoder, tracker, "activations_vae")
    tag_module(models.vae.post_quant_conv, tracker, "activations_vae")
    keep = []
    if cfg.memory.text_encoders == "keep":
        tracker.push("text_encoders")
        keep.append(torch.empty(text_encoder_bytes(arch, dtype), dtype=torch.uint8))
        tracker.pop()
    return keep


def _flash_attention_on_meta(sdpa):
    """``scaled_dot_product_attention`` as the trainer's devices run it, for meta tensors. It picks its
    kernel by device, and on meta it decomposes to the math path, which holds the whole L×L attention
    matrix; CUDA (and the CPU of the tests) run a flash kernel that keeps only the output and the
    log-sum-exp. The CPU flash op has meta support: the trace calls that."""

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta" or enable_gqa:
            return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    return attention


def _merge_as_planned_device(cfg, layers, dtype: torch.dtype) -> None:
    """The adapter group merges its weights by device (a cached copy of W per layer on fp32 CPU); the
    traced layers sit on meta, so they are told what the planned device would decide."""
    from ril_fast import engine as eng
    from ril_fast.lora.group import merges_by_default

    partitioned = eng.use_deepspeed(cfg) and cfg.deepspeed.zero_stage == 3
    merge = merges_by_default(eng.device_type(cfg), dtype, partitioned)
    for layer in layers:
        layer.merge = merge


def _trace_target(meta: bool) -> torch.device:
    return torch.device("meta" if meta else "cpu")


@contextlib.contextmanager
def _trace_device(meta: bool):
    """Where a trace runs: meta tensors (shapes and dtypes, no data; factories default to meta), about
    ten times faster than fake tensors; or real CPU tensors, for the tests that check the plan against
    the trainer's own step."""
    if not meta:
        yield
        return
    from transformers.utils import import_utils

    functional, tensor_cpu, is_fake = torch.nn.functional, torch.Tensor.cpu, import_utils.is_fake_tensor
    sdpa = functional.scaled_dot_product_attention
    # patched, not a TorchFunctionMode: a mode is off inside its own handler, so inside backward (where
    # checkpointed blocks recompute) it would not apply and the recompute would differ
    functional.scaled_dot_product_attention = _flash_attention_on_meta(sdpa)
    # images the evaluation moves to the host stay where they are (meta data cannot be copied)
    torch.Tensor.cpu = lambda self, *a, **k: self if self.device.type == "meta" else tensor_cpu(self, *a, **k)
    # transformers reads attention masks' values unless it sees a tracer; meta tensors are one
    import_utils.is_fake_tensor = lambda x: is_fake(x) or (isinstance(x, torch.Tensor) and x.device.type == "meta")
    try:
        with torch.device("meta"):
            yield
    finally:
        functional.scaled_dot_product_attention = sdpa
        torch.Tensor.cpu = tensor_cpu
        import_utils.is_fake_tensor = is_fake


def plan_step(cfg, task: int = 0, arch: Arch | None = None, fake: bool = True) -> StepPlan:
    """Peak bytes of one training step of task ``task`` (0-based), traced through the trainer's code.

    ``fake=False`` runs the same trace on real CPU tensors (tests compare the two). The caller
    passes ``traced_config(cfg)`` to shorten the no-grad prefix.
    """
    from ril_fast import engine as eng
    from ril_fast import lora
    from ril_fast.config import read_prompts
    from ril_fast.step import Batch, compute_loss, image_size, latent_shape, step_seed, unconditional

    arch = arch or resolve_arch(cfg.model.path)
    dtype = DTYPES[cfg.model.dtype]
    models = build_meta_models(arch, dtype)
    _real_timesteps(models.scheduler)
    models.apply_memory_features(cfg.memory)
    layers = lora.inject_adapter_group(models.unet, cfg.lora.targets)
    _merge_as_planned_device(cfg, layers, dtype)
    n_adapters = task + 1 if cfg.method.adapter_per_task else 1
    for i in range(n_adapters):
        lora.add_task(layers, cfg.lora.rank, cfg.lora.alpha, seed=i, init=cfg.lora.init)
    use_distill = cfg.method.distills_on_task(task)
    height, width = image_size(models, cfg)
    # the trainer builds every task's reward up front (rewards.weight_files caches identical ones); with
    # memory.idle_rewards = cpu only this task's reward is on the device while it trains
    own = cfg.tasks[task]
    built = _build_rewards(cfg, [own] if cfg.memory.idle_rewards == "cpu" else cfg.tasks, _trace_target(fake))
    reward_fn = built[_reward_key(cfg, own)][0]

    tracker = MemoryTracker(count_meta=fake)
    with _trace_device(fake), tracker:
        keep = _materialize_models(cfg, arch, dtype, models, layers, tracker)
        for _, parts in built.values():
            for part in parts or []:
                materialize(part, tracker, lambda *_: "reward_model")
                tag_module(part, tracker, "activations_reward")
        tracker.push("inputs")
        prompts = all_prompts(cfg)
        cache = _FakePromptCache(models, arch, dtype, len(prompts), height, width)
        cache.fill(prompts)
        train = read_prompts(own.train_prompts, f"tasks.{task}.train_prompts")  # what make_batch draws from
        chosen = [train[i % len(train)] for i in range(cfg.train.batch_size)]
        z_T = torch.randn(latent_shape(models, cfg, len(chosen)))
        window = cfg.sampling.grad_window_max or cfg.sampling.grad_window  # the worst K
        batch = Batch(chosen, cache.get(chosen), unconditional(cfg, cache, len(chosen)), z_T, window,
                      step_seed(cfg.seed, task, 0))
        tracker.pop()
        static = tracker.live

        params = lora.trainable_parameters(layers)
        engine = eng.Engine(models.unet, params, cfg, cfg.train.lr, plain=True, optimizer="adamw")

        tracker.push("activations_unet")
        out = compute_loss(models, layers, reward_fn, batch, cfg, use_distill)
        tracker.pop()
        tracker.push("backward")
        engine.backward(out.loss)
        del out
        tracker.pop()
        tracker.push("optimizer_state")
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)  # Engine.step, minus its host sync
        # with ZeRO offload the step and its state live on the host: nothing on the device
        if not optimizer_offloaded(cfg) and cfg.train.optimizer == "adamw8bit":
            keep += _adamw8bit_state(params, tracker)
        elif not optimizer_offloaded(cfg):
            engine.optimizer.step()
        engine.zero_grad()
        tracker.pop()
        if cfg.method.distill:
            ema_update(layers, cfg.method.decay(cfg.tasks[0].steps))
    n_params = sum(p.numel() for p in params)
    cpu = n_params * 16 if optimizer_offloaded(cfg) else 0  # fp32 master + 2 moments + fp32 grads
    resident = {k: v for k, v in tracker.by_tag.items() if v}
    return StepPlan(task, tracker.peak, dict(tracker.peak_by_tag), static, cpu, resident)


def plan_eval(cfg, arch: Arch | None = None, fake: bool = True) -> StepPlan:
    """Peak bytes of the evaluation after the last task (most adapters), traced through the
    trainer's own ``sample_images`` (one ``eval.batch_size`` batch, no grad, DDIM steps cut to two:
    the rest repeat the second) and a reward scoring every (prompt, seed) image of the largest eval task at
    once, as ``evaluate_all_tasks`` does. With ``memory.idle_rewards = cpu`` one reward model is on
    the device at a time (the largest is planned), else all of them.
    """
    import copy

    from ril_fast import lora
    from ril_fast.config import read_prompts
    from ril_fast.evaluate import sample_images
    from ril_fast.step import image_size, latent_shape

    arch = arch or resolve_arch(cfg.model.path)
    cfg = copy.deepcopy(cfg)
    cfg.eval.steps = min(cfg.eval.steps or cfg.sampling.steps, 2)  # later steps repeat the second
    dtype = DTYPES[cfg.model.dtype]
    models = build_meta_models(arch, dtype)
    _real_timesteps(models.scheduler)
    models.apply_memory_features(cfg.memory)
    layers = lora.inject_adapter_group(models.unet, cfg.lora.targets)
    _merge_as_planned_device(cfg, layers, dtype)
    for i in range(len(cfg.tasks) if cfg.method.adapter_per_task else 1):
        lora.add_task(layers, cfg.lora.rank, cfg.lora.alpha, seed=i, init=cfg.lora.init)
    built = _build_rewards(cfg, cfg.tasks, _trace_target(fake))
    eval_prompts = {}  # reward key -> the eval prompts of the first task that uses it
    for i, t in enumerate(cfg.tasks):
        eval_prompts.setdefault(_reward_key(cfg, t), read_prompts(t.eval_prompts, f"tasks.{i}.eval_prompts"))
    n_pairs = max(len(read_prompts(t.eval_prompts, f"tasks.{i}.eval_prompts")) for i, t in enumerate(cfg.tasks))
    n_pairs *= len(cfg.eval.seeds)
    height, width = image_size(models, cfg)

    tracker = MemoryTracker(count_meta=fake)
    with _trace_device(fake), tracker, torch.no_grad():
        _alive = _materialize_models(cfg, arch, dtype, models, layers, tracker)  # counted until we return
        tracker.push("inputs")
        prompts = all_prompts(cfg)
        cache = _FakePromptCache(models, arch, dtype, len(prompts), height, width)
        cache.fill(prompts)
        tracker.pop()
        towers = sorted(built.items(), key=lambda kv: -sum(p.numel() * p.element_size() for part in kv[1][1] or []
                                                           for p in part.parameters()))
        resident = towers if cfg.memory.idle_rewards == "device" else towers[:1]

        def load_rewards():
            for _, (_, parts) in resident:
                for part in parts or []:
                    materialize(part, tracker, lambda *_: "reward_model")
                    tag_module(part, tracker, "activations_reward")

        if cfg.memory.idle_rewards == "device":  # resident while sampling too
            load_rewards()
        every = [p for ps in eval_prompts.values() for p in ps]
        batch = [every[i % len(every)] for i in range(min(cfg.eval.batch_size, n_pairs))]
        one_seed = copy.deepcopy(cfg)
        one_seed.eval.seeds = [0]
        sample_images(models, one_seed, cache, batch, None, lambda n: latent_shape(models, cfg, n))
        # scoring: every image of the task at once, one reward model (or all) on the device
        if cfg.memory.idle_rewards != "device":
            load_rewards()
        tracker.push("inputs")
        images = torch.empty(n_pairs, 3, height, width)  # sample_images returns fp32 images
        tracker.pop()
        for key, (reward_fn, _) in resident:  # a reward scores its own task's prompts (some read them)
            reward_fn(images, [eval_prompts[key][0]] * n_pairs)
    resident_tags = {k: v for k, v in tracker.by_tag.items() if v}
    return StepPlan(-1, tracker.peak, dict(tracker.peak_by_tag), 0, 0, resident_tags)


# ---------------------------------------------------------------------------------------------
# The plan, the budget check, the CLI

GROUPS = {  # breakdown shown to users -> tracker tags
    "weights": ("weights_unet",),
    "adapters": ("adapters",),
    "optimizer_state": ("optimizer_state",),
    "activations": ("activations_unet", "backward", "inputs", "other"),
    "vae": ("weights_vae", "activations_vae"),
    "reward_model": ("reward_model", "activations_reward"),
    "text_encoders": ("text_encoders",),
}


@dataclass
class MemoryPlan:
    """Planned device memory of a training step; the peak is the worst task's."""

    peak_bytes: int
    task: int  # 0-based task whose step peaks
    detail: dict[str, int]  # tracker tag -> live bytes at that peak
    tasks: list[dict] = field(default_factory=list)  # per traced task: task (1-based), name, reward, peak_gib
    cpu_bytes: int = 0  # host memory of offloaded optimizer state
    arch: str = ""
    notes: list[str] = field(default_factory=list)
    eval_bytes: int | None = None  # peak of the evaluation after the last task (None: not planned)
    eval_detail: dict[str, int] = field(default_factory=dict)

    @property
    def worst_gib(self) -> float:
        """The larger of the training step's and the evaluation's peak: what the card must hold."""
        return max(self.peak_bytes, self.eval_bytes or 0) / GIB

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def breakdown(self) -> dict[str, float]:
        """GiB per component at the peak (weights, adapters, optimizer state, activations, VAE, reward, ...)."""
        return {g: sum(self.detail.get(t, 0) for t in tags) / GIB for g, tags in GROUPS.items()}

    def to_dict(self) -> dict:
        r = lambda x: round(x, 3)
        out = {"peak_gib": r(self.peak_gib), "breakdown": {k: r(v) for k, v in self.breakdown.items()},
               "detail_gib": {k: r(v / GIB) for k, v in sorted(self.detail.items())}, "peak_task": self.task + 1,
               "tasks": self.tasks, "cpu_offload_gib": r(self.cpu_bytes / GIB), "arch": self.arch,
               "notes": self.notes}
        if self.eval_bytes is not None:
            out["eval_peak_gib"] = r(self.eval_bytes / GIB)
            out["eval_detail_gib"] = {k: r(v / GIB) for k, v in sorted(self.eval_detail.items())}
        return out


def _signatures(cfg) -> dict[tuple, int]:
    """Tasks with the same reward and distillation have the same step; keep the one with most adapters."""
    out: dict[tuple, int] = {}
    for i, t in enumerate(cfg.tasks):
        key = (_reward_key(cfg, t), cfg.method.distills_on_task(i))
        out[key] = i  # later tasks hold more adapters
    return out


def plan(cfg, tasks: list[int] | None = None, include_eval: bool = True, progress: bool = False) -> MemoryPlan:
    """Plan the peak device memory of ``cfg``'s training step (every distinct task, or ``tasks``),
    and (``include_eval``) of the evaluation run after each task; ``progress``: a bar on stderr."""
    from tqdm.auto import tqdm

    arch = resolve_arch(cfg.model.path)
    traced = traced_config(cfg)
    indices = sorted(_signatures(cfg).values()) if tasks is None else list(tasks)
    bar = tqdm(total=len(indices) + include_eval, desc=f"memory plan ({arch.kind})", unit="trace",
               disable=not progress)
    steps = []
    for i in indices:
        bar.set_postfix_str(f"task {i + 1} step")
        steps.append(plan_step(traced, i, arch))
        bar.update()
    worst = max(steps, key=lambda s: s.peak_bytes)
    notes = []
    if traced.sampling.steps != cfg.sampling.steps:
        notes.append(f"no-grad prefix traced for 1 of {cfg.sampling.steps - traced.sampling.steps + 1} steps "
                     "(identical steps, same peak)")
    if optimizer_offloaded(cfg):
        notes.append("ZeRO offload: optimizer state and fp32 gradients on the host (cpu_offload_gib)")
    if cfg.train.optimizer == "adamw8bit" and not optimizer_offloaded(cfg):
        notes.append("adamw8bit state sized as bitsandbytes allocates it (its kernels cannot run on meta tensors)")
    per_task = [{"task": s.task + 1, "name": cfg.tasks[s.task].name, "reward": cfg.tasks[s.task].reward,
                 "peak_gib": round(s.peak_bytes / GIB, 3)} for s in steps]
    out = MemoryPlan(worst.peak_bytes, worst.task, worst.breakdown, per_task, worst.cpu_bytes,
                     f"{arch.kind} ({arch.source})", notes)
    if include_eval:
        bar.set_postfix_str("evaluation")
        ev = plan_eval(cfg, arch)
        out.eval_bytes, out.eval_detail = ev.peak_bytes, ev.breakdown
        bar.update()
    bar.close()
    return out


def suggested_fixes(cfg, memory_plan: MemoryPlan | None = None) -> list[str]:
    """``--set`` overrides that lower the planned peak for this config, biggest component first."""
    m, fixes = cfg.memory, []
    model_reward = any(t.reward in rewards.TOWERS for t in cfg.tasks)
    by_part = {
        "vae": ([] if m.vae_checkpoint else ["memory.vae_checkpoint=true"])
        + (["memory.vae_slice=true"] if not m.vae_slice and cfg.train.batch_size > 1 else []),
        "reward_model": ((["memory.reward_dtype=bfloat16"] if m.reward_dtype == "float32" else [])
                         + ([] if m.reward_checkpoint else ["memory.reward_checkpoint=true"])) if model_reward else [],
        "activations": ([] if cfg.sampling.checkpoint_unet else ["sampling.checkpoint_unet=true"])
        + ([] if m.unet_block_checkpoint else ["memory.unet_block_checkpoint=true"])
        + (["sampling.grad_window=1 sampling.grad_window_max=null"]
           if cfg.sampling.grad_window > 1 or cfg.sampling.grad_window_max else [])
        + (["train.batch_size=1 (raise train.grad_accum instead)"] if cfg.train.batch_size > 1 else []),
        "optimizer_state": [] if optimizer_offloaded(cfg) or cfg.train.optimizer == "adamw8bit"
        else ["train.optimizer=adamw8bit", "deepspeed.zero_stage=2 deepspeed.offload_optimizer=true"],
        "adapters": ["lora.targets=attn"] if cfg.lora.targets != "attn" else [],
        "weights": ["model.dtype=bfloat16"] if cfg.model.dtype == "float32" else [],
        "text_encoders": ["memory.text_encoders=cpu"] if m.text_encoders == "keep" else [],
    }
    order = sorted(by_part, key=lambda g: -(memory_plan.breakdown.get(g, 0) if memory_plan else 0))
    for g in order:
        fixes += by_part[g]
    return fixes


def check_budget(cfg, memory_plan: MemoryPlan | None = None, progress: bool = False) -> str | None:
    """None when ``memory.budget_gib`` is unset or the planned peak fits; else a one-line refusal."""
    budget = cfg.memory.budget_gib
    if budget is None:
        return None
    p = memory_plan or plan(cfg, progress=progress)
    if p.worst_gib <= budget:
        return None
    if p.peak_gib <= budget:  # the step fits; the evaluation's no-grad batch does not
        return (f"memory.budget_gib: planned evaluation peak {p.eval_bytes / GIB:.1f} GiB exceeds the budget of "
                f"{budget:g} GiB (the training step needs {p.peak_gib:.1f}); try --set eval.batch_size="
                f"{max(1, cfg.eval.batch_size // 2)} (check with python -m ril_fast.memory)")
    top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(p.breakdown.items(), key=lambda kv: -kv[1])[:3])
    fixes = suggested_fixes(cfg, p)
    return (f"memory.budget_gib: planned peak {p.peak_gib:.1f} GiB (task {p.task + 1}: {top} GiB) exceeds the budget "
            f"of {budget:g} GiB; try --set " + ("; ".join(fixes) if fixes else "a smaller sampling size/batch")
            + " (check with python -m ril_fast.memory)")


def format_plan(p: MemoryPlan, cfg) -> str:
    lines = [f"planned peak: {p.peak_gib:.2f} GiB (task {p.task + 1} '{cfg.tasks[p.task].name}', arch {p.arch})"]
    lines += [f"  {k:<16} {v:8.3f} GiB" for k, v in p.breakdown.items()]
    lines += [f"  task {t['task']} {t['name']} [{t['reward']}]: {t['peak_gib']:.2f} GiB" for t in p.tasks]  # 1-based
    if p.cpu_bytes:
        lines.append(f"  host (offloaded optimizer): {p.cpu_bytes / GIB:.3f} GiB")
    if p.eval_bytes is not None:
        top = ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(p.eval_detail.items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"evaluation peak: {p.eval_bytes / GIB:.2f} GiB (batch {cfg.eval.batch_size}, no grad; {top})")
    lines += [f"  note: {n}" for n in p.notes]
    if cfg.memory.budget_gib is not None:
        msg = check_budget(cfg, p)
        lines.append(msg or f"fits the budget of {cfg.memory.budget_gib:g} GiB")
    lines.append("not included: CUDA context (~0.5 GiB), allocator caching/fragmentation, library workspaces")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ril_fast.config import ConfigError, load_config
    from ril_fast.logs import quiet_third_party

    quiet_third_party()
    ap = argparse.ArgumentParser(prog="python -m ril_fast.memory", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="run config JSON")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--task", type=int, action="append", help="plan only this task (1-based); repeatable")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON (with budget_gib and fits)")
    ap.epilog = "Exit status: 0 when the plan fits memory.budget_gib (or none is set), 1 when it does not, 2 on a " \
        "config error."
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    bad = [t for t in args.task or [] if not 1 <= t <= len(cfg.tasks)]
    if bad:
        print(f"--task {bad[0]}: the config has tasks 1..{len(cfg.tasks)}", file=sys.stderr)
        return 2
    p = plan(cfg, [t - 1 for t in args.task] if args.task else None, progress=True)
    refusal = check_budget(cfg, p)
    if args.json:
        out = p.to_dict()
        out["budget_gib"] = cfg.memory.budget_gib
        out["fits"] = None if cfg.memory.budget_gib is None else refusal is None
        print(json.dumps(out, indent=1))
    else:
        print(format_plan(p, cfg))
    return 1 if refusal else 0


if __name__ == "__main__":
    sys.exit(main())
