"""Training-time augmentation on preprocessed, batched image tensors (runs on the tensor's device).

Not torchvision.transforms.v2: on a batched tensor it draws one crop for the whole batch from the global
RNG, and a per-sample loop over it took 8x the CPU time on 64x1x28x28 batches (0.7x on 64x3x224x224;
``benchmarks/augment_speed.py``). Here every sample gets its own crop in one grid_sample call, drawn from
the caller's generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxsparse.errors import OnnxSparseError

CROP_SCALE = (0.35, 1.0)
# relative to the input's own aspect ratio: a 48x192 text line is cropped to 3:1..16:3, not squashed from a
# square crop (on the PP-OCR line classifier the teacher kept its top-1 on 97% of such crops, 70% of square ones)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP_P = 0.5
_ATTEMPTS = 10


def crop_params(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    flip_p: float = FLIP_P,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample (top, left, crop height, crop width, flip), as CPU tensors.

    Like torchvision's RandomResizedCrop: up to 10 tries of a random area fraction in ``scale`` and
    log-uniform aspect ratio in ``ratio``, the first crop that fits wins; if none fits, the largest
    centered crop within ``ratio``. The same generator state always gives the same parameters.
    """
    device = generator.device
    area = float(height * width)
    shape = (n, _ATTEMPTS)
    fraction = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    log_ratio = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    position = torch.rand((n, 2), generator=generator, device=device, dtype=torch.float64)
    flip_draw = torch.rand((n,), generator=generator, device=device, dtype=torch.float64)
    fraction, log_ratio, position, flip_draw = (t.cpu() for t in (fraction, log_ratio, position, flip_draw))

    target = area * (scale[0] + fraction * (scale[1] - scale[0]))
    aspect = torch.exp(math.log(ratio[0]) + log_ratio * (math.log(ratio[1]) - math.log(ratio[0])))
    crop_w = torch.round(torch.sqrt(target * aspect)).long()
    crop_h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)
    crop_w = crop_w.gather(1, first).squeeze(1)
    crop_h = crop_h.gather(1, first).squeeze(1)

    # Fallback when no try fits: centered, aspect clamped into ``ratio``.
    image_ratio = width / height
    if image_ratio < ratio[0]:
        fallback_w, fallback_h = width, int(round(width / ratio[0]))
    elif image_ratio > ratio[1]:
        fallback_w, fallback_h = int(round(height * ratio[1])), height
    else:
        fallback_w, fallback_h = width, height
    any_fit = fits.any(dim=1)
    crop_w = torch.where(any_fit, crop_w, torch.full_like(crop_w, fallback_w))
    crop_h = torch.where(any_fit, crop_h, torch.full_like(crop_h, fallback_h))

    # Uniform integer offsets in 0..size-crop (position is in [0, 1)); centered for the fallback.
    top = torch.floor(position[:, 0] * (height - crop_h + 1).double()).long()
    left = torch.floor(position[:, 1] * (width - crop_w + 1).double()).long()
    top = torch.where(any_fit, torch.minimum(top, height - crop_h), (height - crop_h) // 2)
    left = torch.where(any_fit, torch.minimum(left, width - crop_w), (width - crop_w) // 2)
    flip = flip_draw < flip_p
    return top, left, crop_h, crop_w, flip


def augment_batch(x: torch.Tensor, generator: torch.Generator, layout: str = "nchw", *,
                  flip: bool = True) -> torch.Tensor:
    """Random resized crop (scale 0.35..1, aspect ratio 3/4..4/3 times the input's, bilinear back to the input
    size) and, with ``flip``, a horizontal flip with p=0.5, independently per sample; deterministic for a given
    generator state (the flip draw is taken either way, so ``flip`` changes nothing else).

    ``x`` is a batched image tensor in ``layout`` ("nchw" or "nhwc"); the result has the same shape,
    dtype, layout and device.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise OnnxSparseError(f"augment_batch needs a 4-D image batch, got {shape}")
    if not x.is_floating_point():
        raise OnnxSparseError(f"augment_batch needs a floating-point tensor, got {x.dtype}")
    if layout not in ("nchw", "nhwc"):
        raise OnnxSparseError(f"layout must be nchw or nhwc, got {layout!r}")
    if not isinstance(generator, torch.Generator):
        raise OnnxSparseError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    images = x.permute(0, 3, 1, 2) if layout == "nhwc" else x
    n, _, height, width = images.shape
    if n == 0 or height == 0 or width == 0:
        return x.clone()
    aspect = width / height
    top, left, crop_h, crop_w, flipped = crop_params(n, height, width, generator,
                                                     ratio=(CROP_RATIO[0] * aspect, CROP_RATIO[1] * aspect),
                                                     flip_p=FLIP_P if flip else 0.0)

    # Affine grid over normalized coordinates (align_corners=False): output pixel j samples input
    # x = left + (j + 0.5) * crop_w / width - 0.5, i.e. bilinear resizing of the crop.
    sx = crop_w.double() / width
    sy = crop_h.double() / height
    theta = torch.zeros((n, 2, 3), dtype=torch.float64)
    theta[:, 0, 0] = torch.where(flipped, -sx, sx)
    theta[:, 0, 2] = (2 * left + crop_w).double() / width - 1
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = (2 * top + crop_h).double() / height - 1

    work_dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    work = images.to(work_dtype)
    grid = F.affine_grid(theta.to(device=work.device, dtype=work_dtype), list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.to(x.dtype)
    if layout == "nhwc":
        out = out.permute(0, 2, 3, 1)
    return out.contiguous()
