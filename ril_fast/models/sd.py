"""Loading SD1.5- and SDXL-class models (and the embedded tiny model) from a diffusers folder.

Only the parts the trainer needs are loaded (UNet, VAE, text encoders, tokenizers, scheduler config);
safety checkers and feature extractors are skipped. The scheduler is always a ``DDIMScheduler`` built
from the folder's scheduler config, since the sampler is DDIM whatever the model shipped with.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# A Hugging Face repo id: "name" or "owner/name", no path separators beyond the one slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_REQUIRED = ("unet", "vae", "scheduler")


@dataclass
class Models:
    """The frozen components of a text-to-image model, and the facts the sampler needs about them.

    Attributes:
        kind: "sd" (SD1.x/2.x-style, one text encoder) or "sdxl" (text_time micro-conditioning).
        unet, vae: diffusers ``UNet2DConditionModel`` and ``AutoencoderKL``.
        text_encoders, tokenizers: in the pipeline's order (SDXL: the encoder with projection is last).
        scheduler: a ``DDIMScheduler`` from the folder's scheduler config.
        vae_scale_factor: pixels per latent pixel (8 for SD, 2 for the tiny models).
        latent_channels: UNet input channels.
        sample_size: default image size in pixels.
        prediction_type: "epsilon", "v_prediction" or "sample" (scheduler config).
        vae_scaling_factor, vae_shift_factor: latent = (vae_latent - shift) * scale.
        force_zeros_for_empty_prompt: SDXL pipelines use zero embeddings (not the encoded "") for the
            unconditional CFG branch when this is set in model_index.json.
        path: where the model was loaded from.
    """

    kind: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler: object
    vae_scale_factor: int
    latent_channels: int
    sample_size: int
    prediction_type: str
    vae_scaling_factor: float
    vae_shift_factor: float | None = None
    force_zeros_for_empty_prompt: bool = False
    path: str = ""

    @property
    def is_sdxl(self) -> bool:
        return self.kind == "sdxl"

    @classmethod
    def assemble(cls, kind: str, unet, vae, text_encoders: list, tokenizers: list, scheduler,
                 force_zeros_for_empty_prompt: bool, path: str) -> "Models":
        """Models with the sampler facts (scales, channels, sizes, prediction type) read off the parts."""
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        return cls(kind=kind, unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                   scheduler=scheduler, vae_scale_factor=vae_scale, latent_channels=unet.config.in_channels,
                   sample_size=unet.config.sample_size * vae_scale, prediction_type=scheduler.config.prediction_type,
                   vae_scaling_factor=float(vae.config.scaling_factor),
                   vae_shift_factor=getattr(vae.config, "shift_factor", None),
                   force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, path=path)

    def apply_memory_features(self, memory) -> None:
        """The model-side switches of a config's ``memory`` section. The trainer (``train.build_run``)
        and the memory planner (``ril_fast/memory.py``) both call this, so plan and run agree.

        - ``memory.unet_block_checkpoint``: diffusers' per-block checkpointing inside each UNet call.
        - ``memory.vae_checkpoint``: besides ``sampling.decode`` checkpointing the whole decode, the
          decoder checkpoints its mid block and each up block, so the backward recomputes one block at a
          time (the whole-decode checkpoint alone still rebuilds every activation at once: SDXL
          1024 px, 11.4 -> ~5 GiB).
        """
        if memory.unet_block_checkpoint:
            self.unet.enable_gradient_checkpointing()
        if memory.vae_checkpoint:
            self.vae.enable_gradient_checkpointing()


def _not_found(path: str, why: str) -> str:
    return (
        f"model.path {path!r} not found ({why}): give a local diffusers folder (model_index.json) or a "
        "Hugging Face model id (owner/name)"
    )


def _hub_hint(repo_id: str) -> str:
    return (f"fetch it with `hf download {repo_id}` where there is internet (it fills the HF cache; copy "
            "~/.cache/huggingface here if needed), then run with HF_HUB_OFFLINE=1, or set model.path to a local "
            "diffusers folder")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def cached_snapshot(repo_id: str) -> Path | None:
    """The folder of ``repo_id``'s snapshot in the local HF cache (holding model_index.json), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, "model_index.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def _read_index(path: str) -> dict:
    return json.loads((Path(path) / "model_index.json").read_text())


def check_model_path(path: str) -> str | None:
    """Checks, without loading anything, that ``path`` names a loadable model.

    A folder must hold ``model_index.json`` and the unet, vae and scheduler subfolders. A string that is
    not an existing folder is accepted as a hub id if it looks like one: whether it can be loaded now is
    :func:`check_model_available`'s question (the memory planner needs only the architecture).

    Returns:
        str | None: a one-line error message, or None when the path looks loadable.
    """
    if not isinstance(path, str) or not path:
        return f"model.path must be a non-empty string, got {path!r}: give a local diffusers folder or a hub id"
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            return _not_found(path, "the folder has no model_index.json")
        try:
            index = _read_index(str(p))
        except (OSError, ValueError) as e:
            return f"model.path {path!r}: model_index.json is unreadable ({e}); re-save the pipeline with diffusers"
        missing = [s for s in _REQUIRED if not (p / s).is_dir()]
        has_text = any(index.get(k) and (p / k).is_dir() for k in ("text_encoder", "text_encoder_2"))
        if missing or not has_text:
            what = ", ".join(missing + ([] if has_text else ["text_encoder"]))
            return f"model.path {path!r} lacks the subfolder(s) {what}: give a complete diffusers pipeline folder"
        return None
    if p.exists():
        return _not_found(path, "it is a file, not a folder")
    if path.startswith((".", "/", "~")) or not _HUB_ID.match(path):
        return _not_found(path, "no such folder")
    return None


def check_model_available(path: str, timeout: float = 10.0) -> str | None:
    """Checks that ``path`` can be loaded on this machine now, in seconds and without loading anything.

    A local folder must be complete (:func:`check_model_path`); a hub id must have a complete snapshot
    in the local HF cache or, when not offline, be answered for by the hub (one request, no retries;
    diffusers then downloads it). Without this, a missing model cost minutes of hub retries.

    Returns:
        str | None: a one-line error message naming the ``hf download`` command, or None.
    """
    problem = check_model_path(path)
    if problem or Path(path).expanduser().is_dir():
        return problem
    snapshot = cached_snapshot(path)
    if snapshot is not None:
        problem = check_model_path(str(snapshot))
        return None if problem is None else f"model.path {path!r}: the cached copy is incomplete; " + _hub_hint(path)
    if hub_offline():
        return f"model.path {path!r}: no such folder, and HF_HUB_OFFLINE=1 but the id is not in the local HF cache; " \
            + _hub_hint(path)
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(path, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - no network, no such repo, gated: all mean "cannot load it now"
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"model.path {path!r}: not in the local HF cache and the hub does not serve it ({why}); " \
            + _hub_hint(path)
    return None


def _is_sdxl(index: dict, unet_config) -> bool:
    return bool(index.get("text_encoder_2") and index["text_encoder_2"][0]) or (
        unet_config.get("addition_embed_type") == "text_time"
    )


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def load_models(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vae_dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> Models:
    """Loads a SD1.5/SD2/SDXL-class model (or the embedded tiny model) with every weight frozen.

    Args:
        path (str): a local diffusers folder (``model_index.json``; loaded with ``local_files_only``) or,
            when no such folder exists, a Hugging Face id that diffusers resolves (cache or download).
        dtype (torch.dtype): dtype of the UNet and text encoders. Default fp32.
        device (str | torch.device): where every component goes. Default "cpu".
        vae_dtype (torch.dtype | None): dtype of the VAE; None uses ``dtype``.
        variant (str | None): weight variant to load (e.g. "fp16"), as in diffusers. Default None.

    Returns:
        Models: frozen components in eval mode, with a ``DDIMScheduler``.

    Raises:
        ValueError: the path is not a loadable model (the message of ``check_model_path``), or the
            SDXL UNet's added-embedding width does not match its text encoder.
    """
    from diffusers import DiffusionPipeline

    err = check_model_path(path)
    if err:
        raise ValueError(err)
    local = Path(path).expanduser().is_dir()
    src = str(Path(path).expanduser()) if local else path
    snapshot = None if local else cached_snapshot(path)
    if snapshot is not None and check_model_path(str(snapshot)) is None:
        local, src = True, str(snapshot)  # a complete cached download: no hub requests
    common = dict(local_files_only=True) if local else {}
    try:
        index = _read_index(src) if local else dict(DiffusionPipeline.load_config(src, **common))
        return _load(src, index, dtype, device, vae_dtype, variant, common)
    except OSError as e:  # hub id neither cached nor downloadable, or a folder with missing/broken weights
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if local:
            raise ValueError(
                f"model.path {path!r}: loading failed ({first}); re-save the folder with diffusers' save_pretrained"
            ) from e
        raise ValueError(_not_found(path, f"loading failed: {first}")) from e


def _load(src: str, index: dict, dtype, device, vae_dtype, variant, common: dict) -> Models:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, variant=variant, **common)
    vae = AutoencoderKL.from_pretrained(
        src, subfolder="vae", torch_dtype=vae_dtype or dtype, variant=variant, **common
    )
    kind = "sdxl" if _is_sdxl(index, unet.config) else "sd"
    encoders, tokenizers = [], []
    for te_name, tok_name in [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]:
        if not (index.get(te_name) and index[te_name][0]):
            continue
        # SDXL's last encoder carries the projection that gives the pooled embedding; SD's has none.
        cls = CLIPTextModelWithProjection if (kind == "sdxl" and te_name == "text_encoder_2") else CLIPTextModel
        encoders.append(cls.from_pretrained(src, subfolder=te_name, torch_dtype=dtype, variant=variant, **common))
        tokenizers.append(CLIPTokenizer.from_pretrained(src, subfolder=tok_name, **common))

    sched_config = DDIMScheduler.load_config(src, subfolder="scheduler", **common)
    scheduler = DDIMScheduler.from_config(sched_config)

    for m in [unet, vae, *encoders]:
        _freeze(m).to(device)
    if kind == "sdxl":
        _check_sdxl_dims(src, unet, encoders[-1])
    return Models.assemble(kind, unet, vae, encoders, tokenizers, scheduler,
                           bool(index.get("force_zeros_for_empty_prompt", kind == "sdxl")), src)


def _check_sdxl_dims(path: str, unet, pooled_encoder) -> None:
    # Same check as diffusers' StableDiffusionXLPipeline._get_add_time_ids, done once at load time.
    expected = unet.add_embedding.linear_1.in_features
    got = unet.config.addition_time_embed_dim * 6 + pooled_encoder.config.projection_dim
    if expected != got:
        raise ValueError(
            f"model {path!r}: the UNet's added embedding takes {expected} features but 6 time ids x "
            f"{unet.config.addition_time_embed_dim} + text_encoder_2.projection_dim "
            f"{pooled_encoder.config.projection_dim} = {got}; use a matching SDXL pipeline folder"
        )
