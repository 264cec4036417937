"""Prompt encoding (SD and SDXL text_time conditioning), a per-prompt cache, and the UNet call.

``encode_prompts`` follows diffusers' ``StableDiffusionPipeline.encode_prompt`` and
``StableDiffusionXLPipeline.encode_prompt`` / ``_get_add_time_ids`` (diffusers 0.42.1) without
classifier-free guidance, so its result equals theirs; the unconditional branch comes from
``PromptCache.uncond``.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, replace

import torch

logger = logging.getLogger(__name__)
KEEP_TEXT_ENCODERS = ("cpu", "free")


@dataclass
class Conditioning:
    """Text conditioning of a batch.

    Attributes:
        prompt_embeds (B, L, D): cross-attention states (SDXL: both encoders' penultimate layers, concatenated).
        pooled (B, D2) | None: SDXL pooled embedding of the last text encoder.
        time_ids (B, 6) | None: SDXL micro-conditioning (orig_h, orig_w, crop_top, crop_left, h, w).
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> Conditioning:
        return Conditioning(*(None if x is None else fn(x) for x in (self.prompt_embeds, self.pooled, self.time_ids)))

    def added_cond_kwargs(self) -> dict | None:
        """The UNet's ``added_cond_kwargs`` for SDXL (``text_embeds``, ``time_ids``); None for SD."""
        if self.pooled is None:
            return None
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}

    def cat(self, other: Conditioning) -> Conditioning:
        """Concatenates along the batch (e.g. ``uncond.cat(cond)`` for one CFG UNet call)."""
        return cat_conditionings([self, other])

    def index(self, idx) -> Conditioning:
        """Selects samples along the batch with a slice, int list or index tensor."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return self._map(lambda x: x[idx])

    def repeat(self, n: int) -> Conditioning:
        """Repeats each sample ``n`` times in place (``[a, b] -> [a, a, b, b]``, diffusers' num_images_per_prompt)."""
        return self._map(lambda x: x.repeat_interleave(n, dim=0))

    def to(self, device=None, dtype=None) -> Conditioning:
        """Moves to ``device``; casts floating tensors to ``dtype`` (time_ids included, as diffusers does)."""
        return self._map(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None))


def cat_conditionings(items: list[Conditioning]) -> Conditioning:
    """Concatenates several conditionings along the batch; all must be SD or all SDXL."""
    if len({c.pooled is None for c in items}) > 1:
        raise ValueError("cannot concatenate SD conditioning (pooled None) with SDXL conditioning (pooled set)")
    fields = zip(*((c.prompt_embeds, c.pooled, c.time_ids) for c in items))
    return Conditioning(*(None if xs[0] is None else torch.cat(xs, dim=0) for xs in fields))


def time_ids(height: int, width: int, batch: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """SDXL add_time_ids (B, 6) = (h, w, 0, 0, h, w): original size = target size, no crop."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    return ids.repeat(batch, 1)


def _tokenize(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, model_max_length), padded and truncated as diffusers does."""
    enc = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > enc.input_ids.shape[-1]:
        logger.warning("prompts longer than %d tokens were truncated (as CLIP does)", tokenizer.model_max_length)
    return enc.input_ids, enc.attention_mask


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def encode_prompts(models, prompts: list[str], height: int | None = None, width: int | None = None) -> Conditioning:
    """Encodes prompts with the model's text encoder(s), as the diffusers pipelines do (no CFG).

    Args:
        models (Models): from ``load_models`` (needs its text encoders).
        prompts (list[str]): B prompts.
        height, width (int | None): image size in pixels for SDXL time ids; default ``models.sample_size``.

    Returns:
        Conditioning: on the (last) text encoder's device and dtype; ``prompt_embeds`` (B, 77, D),
        SDXL also ``pooled`` (B, D2) and ``time_ids`` (B, 6).

    Raises:
        ValueError: prompts is not a list of strings.
        RuntimeError: the text encoders were freed (``free_text_encoders(models, "free")``).
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}; wrap one prompt in [...]")
    if not models.text_encoders:
        raise RuntimeError(
            "text encoders were freed (keep_text_encoders='free'); encode every prompt before freeing them "
            "(PromptCache.warm) or set keep_text_encoders='cpu'"
        )
    if models.kind != "sdxl":
        enc, tok = models.text_encoders[0], models.tokenizers[0]
        dev = _device_of(enc)
        ids, mask = _tokenize(tok, prompts)
        # As diffusers: the padding mask is passed only to encoders configured to use one.
        mask = mask.to(dev) if getattr(enc.config, "use_attention_mask", False) else None
        embeds = enc(ids.to(dev), attention_mask=mask)[0]
        return Conditioning(embeds.to(dtype=enc.dtype))

    hidden, pooled = [], None
    for enc, tok in zip(models.text_encoders, models.tokenizers):
        out = enc(_tokenize(tok, prompts)[0].to(_device_of(enc)), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:  # only the encoder with projection returns (B, D2) first
            pooled = out[0]
        hidden.append(out.hidden_states[-2])  # SDXL uses the penultimate layer, before the final LayerNorm
    last = models.text_encoders[-1]
    embeds = torch.cat([h.to(_device_of(last)) for h in hidden], dim=-1).to(dtype=last.dtype)
    h = height or models.sample_size
    w = width or models.sample_size
    return Conditioning(embeds, pooled, time_ids(h, w, len(prompts), dtype=embeds.dtype, device=embeds.device))


class PromptCache:
    """Caches the conditioning of each prompt string so the text encoders run once per unique prompt.

    Entries are stored per prompt (batch of 1) on ``device`` in ``dtype``; ``get`` assembles a batch.

    Args:
        models (Models): the loaded models.
        device, dtype: where cached tensors live (normally the UNet's device and dtype); None keeps the
            text encoder's.
        height, width (int | None): image size for SDXL time ids; default ``models.sample_size``.
    """

    def __init__(self, models, device=None, dtype=None, height: int | None = None, width: int | None = None):
        self.models = models
        self.device, self.dtype = device, dtype
        self.height, self.width = height or models.sample_size, width or models.sample_size
        self._cache: dict[str, Conditioning] = {}
        self.encoder_calls = 0  # number of encode_prompts batches run (tests and logs read it)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._cache

    def __len__(self) -> int:
        return len(self._cache)

    def warm(self, prompts: list[str]) -> None:
        """Encodes every prompt not yet cached, in one batch (call with train + eval prompts before freeing)."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if not todo:
            return
        cond = encode_prompts(self.models, todo, self.height, self.width).to(self.device, self.dtype)
        self.encoder_calls += 1
        for i, p in enumerate(todo):
            self._cache[p] = cond.index(i)

    def get(self, prompts: list[str]) -> Conditioning:
        """Conditioning (B, ...) for ``prompts``, encoding only the prompts not cached yet."""
        self.warm(prompts)
        return cat_conditionings([self._cache[p] for p in prompts])

    def uncond(self, batch: int) -> Conditioning:
        """The unconditional CFG branch (B, ...): the encoded empty prompt, or zero embeddings for SDXL
        pipelines with ``force_zeros_for_empty_prompt`` (as diffusers does when no negative prompt is given)."""
        if self.models.force_zeros_for_empty_prompt and self.models.kind == "sdxl":
            key = "\0zeros"  # cannot collide with a real prompt's cache entry
            if key not in self._cache:
                self.warm([""])
                empty = self._cache[""]
                self._cache[key] = replace(
                    empty, prompt_embeds=torch.zeros_like(empty.prompt_embeds), pooled=torch.zeros_like(empty.pooled)
                )
            return self._cache[key].repeat(batch)
        return self.get([""]).repeat(batch)


def free_text_encoders(models, mode: str = "cpu") -> None:
    """Releases the text encoders' accelerator memory once every prompt is cached.

    Args:
        models (Models): modified in place.
        mode (str): "cpu" moves the encoders to CPU (they can still encode, slowly); "free" drops them.

    Raises:
        ValueError: unknown mode.
    """
    if mode not in KEEP_TEXT_ENCODERS:
        raise ValueError(f"keep_text_encoders={mode!r} is not allowed; use one of {KEEP_TEXT_ENCODERS}")
    if mode == "cpu":
        for enc in models.text_encoders:
            enc.to("cpu")
    else:
        models.text_encoders = []
        gc.collect()  # ~1 s on a loaded process; only here, where the weights must really go
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unet_forward(models, latents: torch.Tensor, t, cond: Conditioning, unet=None) -> torch.Tensor:
    """Calls the UNet with the text conditioning (SDXL: plus ``added_cond_kwargs``).

    Args:
        models (Models): the loaded models.
        latents (B, C, h, w): noisy latents (already scaled by the scheduler's ``scale_model_input``).
        t: timestep (int, 0-d or (B,) tensor).
        cond (Conditioning): batch B.
        unet: a module to call instead of ``models.unet`` (e.g. a wrapped or teacher UNet).

    Returns:
        (B, C, h, w) model output (eps, v or x0 according to ``models.prediction_type``).
    """
    unet = unet if unet is not None else models.unet
    return unet(
        latents,
        t,
        encoder_hidden_states=cond.prompt_embeds,
        added_cond_kwargs=cond.added_cond_kwargs(),
        return_dict=False,
    )[0]
