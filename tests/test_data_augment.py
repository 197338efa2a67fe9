"""Training-time augmentation: random resized crop + horizontal flip on batched tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from onnxsparse.data import augment_batch
from onnxsparse.data.augment import CROP_RATIO, CROP_SCALE, crop_params
from onnxsparse.errors import OnnxSparseError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shape_dtype_and_determinism():
    x = torch.randn(6, 3, 20, 24)
    out = augment_batch(x, gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert torch.equal(out, augment_batch(x, gen(0)))
    assert not torch.equal(out, augment_batch(x, gen(1)))
    assert not torch.equal(out, x)


def test_generator_advances_between_calls():
    x = torch.randn(4, 1, 16, 16)
    g = gen(0)
    assert not torch.equal(augment_batch(x, g), augment_batch(x, g))


def test_crop_parameters_in_range():
    top, left, h, w, flip = crop_params(2000, 30, 40, gen(3))
    assert ((h >= 1) & (h <= 30) & (w >= 1) & (w <= 40)).all()
    assert ((top >= 0) & (top + h <= 30) & (left >= 0) & (left + w <= 40)).all()
    area = (h * w).double() / (30 * 40)
    # Rounding to whole pixels moves the area a little outside the nominal range.
    assert area.min() >= CROP_SCALE[0] * 0.9 and area.max() <= 1.0
    ratio = w.double() / h.double()
    assert ratio.min() >= CROP_RATIO[0] * 0.9 and ratio.max() <= CROP_RATIO[1] * 1.1
    assert 0.45 < flip.double().mean() < 0.55
    assert len({(int(a), int(b)) for a, b in zip(h, w)}) > 50


def test_fallback_for_extreme_aspect():
    top, left, h, w, _ = crop_params(50, 2, 200, gen(0))
    assert ((h >= 1) & (h <= 2) & (left + w <= 200)).all()


def test_matches_crop_then_bilinear_resize_in_the_interior():
    torch.manual_seed(0)
    x = torch.randn(8, 2, 24, 32, dtype=torch.float64)
    out = augment_batch(x, gen(5))
    top, left, h, w, flip = crop_params(8, 24, 32, gen(5), ratio=(CROP_RATIO[0] * 32 / 24, CROP_RATIO[1] * 32 / 24))
    for i in range(8):
        crop = x[i : i + 1, :, top[i] : top[i] + h[i], left[i] : left[i] + w[i]]
        ref = F.interpolate(crop, size=(24, 32), mode="bilinear", align_corners=False)[0]
        if flip[i]:
            ref = ref.flip(-1)
        # Edge pixels differ: interpolate clamps at the crop border, the grid samples just past it.
        rows = slice(math.ceil(24 / h[i].item()), 24 - math.ceil(24 / h[i].item()))
        cols = slice(math.ceil(32 / w[i].item()), 32 - math.ceil(32 / w[i].item()))
        torch.testing.assert_close(out[i][:, rows, cols], ref[:, rows, cols], atol=1e-9, rtol=0)


def test_full_crop_without_flip_is_identity():
    x = torch.randn(1, 3, 10, 10)
    # Find a seed whose single sample is the full image without a flip.
    for seed in range(2000):
        top, left, h, w, flip = crop_params(1, 10, 10, gen(seed))
        if h.item() == 10 and w.item() == 10 and not flip.item():
            torch.testing.assert_close(augment_batch(x, gen(seed)), x, atol=1e-5, rtol=0)
            return
    pytest.skip("no full-crop draw found")


def test_flip_only_mirrors():
    x = torch.arange(10.0).repeat(1, 1, 10, 1)  # value = column index
    for seed in range(2000):
        top, left, h, w, flip = crop_params(1, 10, 10, gen(seed))
        if h.item() == 10 and w.item() == 10 and flip.item():
            torch.testing.assert_close(augment_batch(x, gen(seed)), x.flip(-1), atol=1e-5, rtol=0)
            return
    pytest.skip("no full-crop flipped draw found")


def test_nhwc_matches_nchw():
    x = torch.randn(5, 3, 12, 14)
    nchw = augment_batch(x, gen(9), "nchw")
    nhwc = augment_batch(x.permute(0, 2, 3, 1).contiguous(), gen(9), "nhwc")
    torch.testing.assert_close(nhwc.permute(0, 3, 1, 2), nchw)


def test_half_precision_and_empty_batch():
    x = torch.randn(3, 1, 8, 8).half()
    assert augment_batch(x, gen(0)).dtype == torch.float16
    assert augment_batch(torch.empty(0, 3, 8, 8), gen(0)).shape == (0, 3, 8, 8)


@pytest.mark.parametrize(
    "x, layout, match",
    [
        (torch.zeros(3, 8, 8), "nchw", "4-D image batch"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.int64), "nchw", "floating-point"),
        (torch.zeros(1, 3, 8, 8), "chw", "layout must be nchw or nhwc"),
    ],
)
def test_rejects_bad_input(x, layout, match):
    with pytest.raises(OnnxSparseError, match=match):
        augment_batch(x, gen(0), layout)


@pytest.mark.cuda
def test_runs_on_cuda():
    x = torch.randn(4, 3, 16, 16)
    out = augment_batch(x.cuda(), gen(2))
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), augment_batch(x, gen(2)), atol=1e-5, rtol=0)


def test_crops_keep_the_input_aspect_ratio_range():
    """A wide text line (48x192) gets crops of aspect 3/4..4/3 times its own (3..5.33), not squashed squares."""
    x = torch.arange(48 * 192, dtype=torch.float32).reshape(1, 1, 48, 192).repeat(64, 1, 1, 1)
    g = gen(4)
    state = g.get_state()
    augment_batch(x, g)
    g.set_state(state)
    _, _, h, w, _ = crop_params(64, 48, 192, g, ratio=(CROP_RATIO[0] * 4, CROP_RATIO[1] * 4))
    aspect = w.double() / h.double()
    assert (aspect > 2.9).all() and (aspect < 5.5).all(), aspect


def test_flip_off_changes_only_the_flip():
    x = torch.randn(32, 3, 16, 16)
    flipped_or_not = augment_batch(x, gen(7))
    plain = augment_batch(x, gen(7), flip=False)
    _, _, _, _, flip = crop_params(32, 16, 16, gen(7))
    assert flip.any() and (~flip).any()
    torch.testing.assert_close(plain[~flip], flipped_or_not[~flip], atol=0, rtol=0)
    torch.testing.assert_close(plain[flip], flipped_or_not[flip].flip(-1), atol=1e-5, rtol=0)
