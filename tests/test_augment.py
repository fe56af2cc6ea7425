"""The shared augmentation primitives (counterattack.augment) beyond what the MAC and R-TPT tests cover:
wide parameter ranges against torchvision and PIL, the pixel conventions of the warps, the row helper
and the gradients."""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

from counterattack.augment import (
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, affine, apply_to_rows, autocontrast, blend,
    crop_and_resize, gaussian_blur, pixel_affine_to_theta, posterize, solarize, straight_through, warp,
)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uniform(low: float, high: float, *shape: int, seed: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator(seed))


def images_with_gray_pixels(n: int = 4, height: int = 18, width: int = 26, seed: int = 0) -> torch.Tensor:
    """Random non-square images whose top rows are gray (no hue) and whose corners are black and white."""
    x = torch.rand(n, 3, height, width, generator=generator(seed))
    x[:, :, :3] = x[:, :1, :3]
    x[:, :, -1, -1], x[:, :, -1, 0] = 0.0, 1.0
    return x


def test_affine_equals_torchvisions_with_fill_0_over_wide_ranges():
    """Large rotations and scales put much of the output outside the input, where the coverage mask decides."""
    x = images_with_gray_pixels(6)
    angle, scale = uniform(-60, 60, 6, seed=1), uniform(0.6, 1.4, 6, seed=2)
    shift = torch.randint(-5, 6, (6, 2), generator=generator(3)).float()
    ours = affine(x, angle, shift, scale)
    for i in range(len(x)):
        theirs = TF.affine(x[i], angle=float(angle[i]), translate=[int(shift[i, 0]), int(shift[i, 1])],
                           scale=float(scale[i]), shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR,
                           fill=[0.0] * 3)
        assert torch.allclose(ours[i], theirs, atol=1e-5)


def test_affine_without_motion_is_the_identity():
    x = images_with_gray_pixels()
    n = len(x)
    assert torch.allclose(affine(x, torch.zeros(n), torch.zeros(n, 2), torch.ones(n)), x, atol=1e-6)


def test_pixel_affine_maps_follow_pils_pixel_centres_on_a_non_square_image():
    """Maps that land on pixel centres move whole pixels: a mirror, a shift, and a shear along each axis,
    whose off-diagonal terms are where the image's aspect ratio enters the normalised matrix."""
    x = images_with_gray_pixels(1, height=12, width=20)[0]  # float32 grid coordinates: agreement to 1e-5
    height, width = x.shape[-2:]
    one, zero = torch.ones(1), torch.zeros(1)

    def mapped(a, b, c, d, e, f) -> torch.Tensor:
        theta = pixel_affine_to_theta(*(torch.as_tensor(v, dtype=torch.float32).expand(1) for v in (a, b, c, d, e, f)),
                                      height, width)
        return warp(x[None], theta)[0]

    assert torch.allclose(mapped(-one, zero, width, zero, one, zero), x.flip(-1), atol=1e-5)
    shifted = torch.zeros_like(x)
    shifted[:, 2:, : width - 3] = x[:, : height - 2, 3:]  # output (x, y) reads input (x + 3, y - 2)
    assert torch.allclose(mapped(one, zero, 3.0, zero, one, -2.0), shifted, atol=1e-5)
    # (x, y) -> (x + y - 1/2, y): output pixel (i, j) reads input pixel (i + j, j); beyond the right edge, 0.
    sheared_x, sheared_y = torch.zeros_like(x), torch.zeros_like(x)
    for j in range(height):
        sheared_x[:, j, : max(width - j, 0)] = x[:, j, j:]
    for i in range(width):
        sheared_y[:, : max(height - i, 0), i] = x[:, i:, i]
    assert torch.allclose(mapped(one, one, -0.5, zero, one, zero), sheared_x, atol=1e-5)
    assert torch.allclose(mapped(one, zero, zero, one, one, -0.5), sheared_y, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [3, 7])
def test_colour_and_blur_equal_torchvisions_over_wide_ranges(kernel_size):
    """Factors far from 1 clamp pixels and hue shifts up to half a turn wrap around; gray pixels keep no hue."""
    x = images_with_gray_pixels(5, seed=4)
    factor, hue, sigma = uniform(0.3, 1.7, 5, seed=5), uniform(-0.5, 0.5, 5, seed=6), uniform(0.3, 2.5, 5, seed=7)
    ours = {"brightness": adjust_brightness(x, factor), "contrast": adjust_contrast(x, factor),
            "saturation": adjust_saturation(x, factor), "hue": adjust_hue(x, hue),
            "blur": gaussian_blur(x, sigma, kernel_size)}
    for i in range(len(x)):
        theirs = {"brightness": TF.adjust_brightness(x[i], float(factor[i])),
                  "contrast": TF.adjust_contrast(x[i], float(factor[i])),
                  "saturation": TF.adjust_saturation(x[i], float(factor[i])),
                  "hue": TF.adjust_hue(x[i], float(hue[i])),
                  "blur": TF.gaussian_blur(x[i], [kernel_size] * 2, [float(sigma[i])] * 2)}
        for name, expected in theirs.items():
            assert torch.allclose(ours[name][i], expected, atol=1e-5), name


def eight_bit(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 24), generator=generator(seed)) / 255


def as_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def test_posterize_and_solarize_equal_pils_for_each_images_own_parameter():
    x = eight_bit(8, seed=8)
    bits = torch.arange(1, 9).float()
    thresholds = torch.tensor([0.0, 1.0, 64.0, 128.0, 129.0, 200.0, 255.0, 256.0])
    posterized, solarized = posterize(x, bits), solarize(x, thresholds)
    for i in range(len(x)):
        assert torch.allclose(posterized[i], from_pil(ImageOps.posterize(as_pil(x[i]), int(bits[i]))), atol=1e-6)
        assert torch.allclose(solarized[i], from_pil(ImageOps.solarize(as_pil(x[i]), int(thresholds[i]))), atol=1e-6)


def test_apply_to_rows_leaves_the_other_rows_and_their_gradients_alone():
    x = torch.rand(6, 3, 5, 5, generator=generator(9)).requires_grad_(True)
    chosen = torch.tensor([4, 1])
    seen = []

    def double(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        seen.append(index)
        return 2 * rows

    out = apply_to_rows(x, chosen, double)
    assert torch.equal(seen[0], chosen)
    others = torch.tensor([0, 2, 3, 5])
    assert torch.equal(out[others], x[others]) and torch.equal(out[chosen], 2 * x[chosen])
    weights = torch.randn(x.shape, generator=generator(10))
    (gradient,) = torch.autograd.grad((out * weights).sum(), x)
    assert torch.equal(gradient[others], weights[others]) and torch.equal(gradient[chosen], 2 * weights[chosen])
    assert apply_to_rows(x, torch.tensor([], dtype=torch.long), double) is x and len(seen) == 1


def test_straight_through_keeps_the_value_and_passes_the_gradient():
    x = eight_bit(2, seed=11).requires_grad_(True)
    after = posterize(x, torch.tensor([2.0, 3.0]))
    passed = straight_through(x, after)
    assert torch.equal(passed, after)
    weights = torch.randn(x.shape, generator=generator(12))
    (gradient,) = torch.autograd.grad((passed * weights).sum(), x)
    assert torch.allclose(gradient, weights)


def test_gradients_flow_through_every_differentiable_operation():
    """Finite differences in float64, in the images and in each operation's own continuous parameters."""
    x = (0.05 + 0.9 * torch.rand(2, 3, 6, 7, generator=generator(13), dtype=torch.float64)).requires_grad_(True)
    towards = torch.rand(2, 3, 6, 7, generator=generator(14), dtype=torch.float64)

    def parameter(low: float, high: float, seed: int, *shape: int) -> torch.Tensor:
        return uniform(low, high, *(shape or (2,)), seed=seed).double().requires_grad_(True)

    angle, scale, factor = parameter(-20, 20, 15), parameter(0.8, 1.2, 16), parameter(0.8, 1.2, 17)
    hue, sigma, theta = parameter(-0.2, 0.2, 18), parameter(0.5, 1.5, 19), parameter(-0.3, 0.3, 20, 2, 2, 3)
    theta_base = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    boxes = torch.tensor([[1.0, 2.0, 4.0, 3.0], [0.0, 0.0, 6.0, 7.0]], dtype=torch.float64)
    shift = torch.tensor([[1.0, 0.0], [-1.0, 2.0]], dtype=torch.float64)
    checks = {
        "affine": (lambda im, a, s: affine(im, a, shift, s), (x, angle, scale)),
        "warp": (lambda im, t: warp(im, theta_base + t), (x, theta)),
        "crop_and_resize": (lambda im: crop_and_resize(im, boxes, torch.tensor([True, False])), (x,)),
        "blend": (lambda im, t, f: blend(im, t, f, clamp=False), (x, towards.requires_grad_(True), factor)),
        "brightness": (adjust_brightness, (x, factor)),
        "contrast": (adjust_contrast, (x, factor)),
        "saturation": (adjust_saturation, (x, factor)),
        "hue": (adjust_hue, (x, hue)),
        "blur": (lambda im, s: gaussian_blur(im, s, 5), (x, sigma)),
        "autocontrast": (autocontrast, (x,)),
        "solarize": (lambda im: solarize(im, torch.tensor([128.0, 64.0], dtype=torch.float64)), (x,)),
    }
    for name, (function, inputs) in checks.items():
        assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-5), name
        (gradient,) = torch.autograd.grad(function(*inputs).sum(), x)
        assert gradient.abs().sum(dim=(1, 2, 3)).gt(0).all(), name
