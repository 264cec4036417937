"""Torch CLIP preprocessing vs transformers' CLIPImageProcessor and the open_clip (PIL + torchvision) path.

Both references run PIL on uint8, so inputs are quantised to /255 first and the comparison is in [0, 1]
pixel units (the normalised difference times std). Tolerance: max 1.5/255, mean 0.5/255 per pixel; the
residual is PIL's uint8 rounding of the resized image (measured: max 1.06/255, mean 0.30/255).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from ril_fast.rewards.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    center_crop,
    clip_preprocess,
    resize_longest_pad,
    shortest_side_size,
)

STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
# (h, w) -> shortest side 224; (301, 417) and (417, 301) give crop offsets of 43 (equal); (200, 315)
# resizes to 224x352: offset 64; (100, 130): 224x291, offset 33.5 -> floor 33, round 34 (half-even 34)
SHAPES = [(256, 256), (301, 417), (160, 200), (512, 384), (100, 130), (130, 100)]


def smooth_image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, h // 8 + 2, w // 8 + 2, generator=g)
    noise = torch.rand(1, 3, h, w, generator=g)
    img = torch.nn.functional.interpolate(base, (h, w), mode="bilinear") * 0.8 + 0.2 * noise
    return (img * 255).round() / 255


def to_pil(img):
    return Image.fromarray((img[0].permute(1, 2, 0) * 255).round().byte().numpy())


def pixel_err(ours, ref):
    return ((ours - ref) * STD).abs() * 255


@pytest.mark.parametrize("hw", SHAPES)
def test_matches_transformers_clip_image_processor(hw):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    img = smooth_image(*hw, seed=hw[0])
    ref = torch.from_numpy(np.asarray(proc(to_pil(img), return_tensors="np")["pixel_values"][0]))[None]
    err = pixel_err(clip_preprocess(img, crop_rounding="floor"), ref)
    assert err.max() < 1.5 and err.mean() < 0.5, (err.max(), err.mean())


@pytest.mark.parametrize("hw", SHAPES)
def test_matches_open_clip_pil_path(hw):
    # open_clip / HPSv2 / ImageReward preprocess_val on a PIL image = PIL bicubic resize of the shortest side
    # (torchvision.Resize calls PIL) + torchvision CenterCrop (round((h - 224) / 2)) + ToTensor + Normalize
    img = smooth_image(*hw, seed=hw[1])
    nh, nw = shortest_side_size(*hw, 224)
    arr = np.asarray(to_pil(img).resize((nw, nh), Image.BICUBIC), dtype=np.float32) / 255
    top, left = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
    ref = torch.from_numpy(arr[top : top + 224, left : left + 224]).permute(2, 0, 1)[None]
    ref = (ref - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / STD
    err = pixel_err(clip_preprocess(img, crop_rounding="round"), ref)
    assert err.max() < 1.5 and err.mean() < 0.5, (err.max(), err.mean())


def test_crop_rounding_conventions_differ_by_one_pixel():
    x = torch.arange(291.0).view(1, 1, 1, 291).expand(1, 3, 224, 291)
    assert center_crop(x, 224, "floor")[0, 0, 0, 0] == 33  # transformers: (291 - 224) // 2
    assert center_crop(x, 224, "round")[0, 0, 0, 0] == 34  # torchvision: round(33.5) = 34
    with pytest.raises(ValueError, match="crop_rounding"):
        center_crop(x, 224, "ceil")
    with pytest.raises(ValueError, match="centre-crop 300x300"):
        center_crop(x, 300)


def test_longest_pad_equals_shortest_crop_on_square_and_pads_otherwise():
    sq = torch.rand(2, 3, 96, 96)
    torch.testing.assert_close(clip_preprocess(sq, 64, resize_mode="longest_pad"), clip_preprocess(sq, 64))
    rect = torch.rand(1, 3, 40, 80)
    out = resize_longest_pad(rect, 64)
    assert out.shape == (1, 3, 64, 64)
    assert torch.all(out[..., :16, :] == 0) and torch.all(out[..., 48:, :] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_differentiable_batched_any_dtype(dtype):
    x = torch.rand(3, 3, 70, 90, dtype=dtype, requires_grad=True)
    out = clip_preprocess(x, 32)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    out.square().sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert (x.grad.float().flatten(1).abs().sum(1) > 0).all()
    singles = torch.cat([clip_preprocess(x[i : i + 1].detach(), 32) for i in range(3)])
    torch.testing.assert_close(clip_preprocess(x.detach(), 32), singles)
    # no clamp: out-of-range pixels keep their gradient (AlignProp/TRL clamp and lose it)
    y = torch.full((1, 3, 32, 32), 1.2, requires_grad=True)
    clip_preprocess(y, 32).sum().backward()
    assert torch.all(y.grad != 0)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        clip_preprocess(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="float tensor"):
        clip_preprocess(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="resize_mode"):
        clip_preprocess(torch.rand(1, 3, 32, 32), resize_mode="stretch")
