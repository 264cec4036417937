"""Differentiable CLIP-style image preprocessing in torch: resize, centre crop, normalise.

Every reference scorer (transformers' ``CLIPImageProcessor``, open_clip's ``preprocess_val``, ImageReward,
HPSv2) runs PIL on uint8 images, which cuts the gradient. These functions do the same arithmetic on
float tensors on any device:

- resize: the shortest side to ``size`` (the long side becomes ``int(size * long / short)``, as both
  references compute it), bicubic with ``antialias=True``. torch's antialiased bicubic uses the same
  kernel as PIL (a = -0.5, support widened by the downscale factor), so it matches PIL's resize up to
  PIL's uint8 rounding and clipping.
- centre crop: transformers takes ``top = (h - crop) // 2``; torchvision (open_clip, ImageReward,
  HPSv2) takes ``round((h - crop) / 2)``. They differ by one pixel when ``h - crop`` is odd, so the
  rounding is an option (``crop_rounding="floor" | "round"``).
- normalise with the CLIP mean/std.

Parity (tests/test_preprocess.py): on images quantised to /255, the output matches
``CLIPImageProcessorPil`` and a PIL resize + torchvision-rounded crop within 1.5/255 per pixel before
normalisation (max), 0.2/255 mean; the remainder is PIL's uint8 rounding of the resized image.

No clamping to [0, 1]: a clamp zeroes the gradient on saturated pixels, and the sampler's decoded
images are the caller's business.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# OpenAI CLIP statistics; also used by open_clip ViT-H-14 (HPSv2), PickScore, ImageReward (BLIP).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_CROP_ROUNDINGS = ("floor", "round")


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W]; got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1]; got dtype {images.dtype} (divide uint8 by 255)")


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) when the shortest side is resized to ``size`` (transformers' and torchvision's rule)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_shortest(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize [B, C, H, W] so the shortest side is ``size``: antialiased bicubic, computed in fp32."""
    h, w = images.shape[-2:]
    out_hw = shortest_side_size(h, w, size)
    if out_hw == (h, w):
        return images
    x = images.float()  # CPU bicubic has no bf16 kernel, and fp32 keeps the PIL-matching precision
    return F.interpolate(x, size=out_hw, mode="bicubic", antialias=True, align_corners=False).to(images.dtype)


def resize_longest_pad(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Resize so the longest side is ``size`` and pad to a centred square (open_clip ``ResizeMaxSize``)."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    x = images
    if (nh, nw) != (h, w):
        x = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        x = x.to(images.dtype)
    pad_h, pad_w = size - nh, size - nw
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def center_crop(images: torch.Tensor, size: int, rounding: str = "floor") -> torch.Tensor:
    """Crop the centre ``size`` x ``size`` window; ``rounding`` picks the off-by-one convention."""
    if rounding not in _CROP_ROUNDINGS:
        raise ValueError(f"crop_rounding must be one of {_CROP_ROUNDINGS}; got {rounding!r}")
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {h}x{w} image; resize first")
    if rounding == "floor":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    crop_size: int | None = None,
    mean=CLIP_MEAN,
    std=CLIP_STD,
    crop_rounding: str = "floor",
    resize_mode: str = "shortest",
) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> normalised [B, 3, crop, crop] fp32, differentiable.

    Args:
        size: target of the shortest side ("shortest") or of the longest side ("longest_pad").
        crop_size: centre crop; defaults to ``size``.
        crop_rounding: "floor" (transformers ``CLIPImageProcessor``) or "round" (torchvision, used by
            open_clip / HPSv2 / ImageReward). Identical for square inputs.
        resize_mode: "shortest" (resize shortest side, then crop) or "longest_pad" (open_clip
            ``ResizeMaxSize``: resize longest side, pad with 0). Identical for square inputs.
    """
    _check_images(images)
    x = images.float()
    crop = size if crop_size is None else crop_size
    if resize_mode == "shortest":
        x = center_crop(resize_shortest(x, size), crop, crop_rounding)
    elif resize_mode == "longest_pad":
        x = resize_longest_pad(x, size)
        if crop != size:
            x = center_crop(x, crop, crop_rounding)
    else:
        raise ValueError(f"resize_mode must be 'shortest' or 'longest_pad'; got {resize_mode!r}")
    return normalize(x, mean, std)
