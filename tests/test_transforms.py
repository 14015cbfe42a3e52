"""The augmentation does what the brief says, and evaluation is deterministic."""

import numpy as np
import pytest
import torch

from transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    HOLE_SIZE,
    MEAN_PIXEL,
    denormalize,
    describe_transform,
    eval_transforms,
    normalize_images,
    seed_transform,
    train_transforms,
)


def random_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def to_pixels(tensor: torch.Tensor) -> np.ndarray:
    return np.rint(denormalize(tensor) * 255).astype(int)


def test_train_transform_returns_a_normalised_float_tensor() -> None:
    out = train_transforms()(image=random_image())["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert -3.0 < out.min() and out.max() < 3.0


def test_mean_pixel_is_the_dataset_mean_colour_in_uint8_units() -> None:
    assert MEAN_PIXEL == (125, 123, 114)
    assert all(abs(p / 255 - m) < 0.5 / 255 for p, m in zip(MEAN_PIXEL, CIFAR10_MEAN))


def test_cutout_is_exactly_one_16x16_hole_of_the_mean_colour() -> None:
    # A black image makes the hole the only non-black pixels.
    transform = train_transforms(flip_p=0.0, affine_p=0.0, cutout_p=1.0)
    seed_transform(transform, 0)
    for _ in range(20):
        pixels = to_pixels(transform(image=np.zeros((32, 32, 3), np.uint8))["image"])
        rows, cols = np.nonzero(pixels.any(axis=2))
        assert len(rows) == HOLE_SIZE * HOLE_SIZE
        assert rows.max() - rows.min() + 1 == HOLE_SIZE
        assert cols.max() - cols.min() + 1 == HOLE_SIZE
        assert {tuple(p) for p in pixels[rows, cols]} == {MEAN_PIXEL}


def test_horizontal_flip_happens_about_half_the_time() -> None:
    transform = train_transforms(affine_p=0.0, cutout_p=0.0)
    seed_transform(transform, 0)
    image = random_image()
    plain = eval_transforms()(image=image)["image"]
    mirrored = eval_transforms()(image=image[:, ::-1].copy())["image"]
    flips = 0
    for _ in range(400):
        out = transform(image=image)["image"]
        assert torch.equal(out, plain) or torch.equal(out, mirrored)
        flips += torch.equal(out, mirrored)
    assert 160 <= flips <= 240


def test_shift_scale_rotate_moves_pixels() -> None:
    transform = train_transforms(flip_p=0.0, affine_p=1.0, cutout_p=0.0)
    seed_transform(transform, 0)
    image = random_image()
    plain = eval_transforms()(image=image)["image"]
    assert not torch.equal(transform(image=image)["image"], plain)


def test_seeded_transforms_repeat() -> None:
    a, b = train_transforms(), train_transforms()
    seed_transform(a, 7)
    seed_transform(b, 7)
    image = random_image()
    for _ in range(5):
        assert torch.equal(a(image=image)["image"], b(image=image)["image"])


def test_test_transform_is_deterministic_and_inverted_by_denormalize() -> None:
    image = random_image(1)
    first, second = (eval_transforms()(image=image)["image"] for _ in range(2))
    assert torch.equal(first, second)
    np.testing.assert_array_equal(to_pixels(first), image)
    expected = (image[0, 0] / 255 - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
    np.testing.assert_allclose(first[:, 0, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_denormalize_rejects_a_batch() -> None:
    with pytest.raises(ValueError, match="3xHxW"):
        denormalize(torch.zeros(2, 3, 32, 32))


def test_normalize_images_matches_the_test_transform_image_by_image() -> None:
    images = np.stack([random_image(seed) for seed in range(4)])
    fed = torch.stack([eval_transforms()(image=image)["image"] for image in images])
    assert torch.allclose(normalize_images(images), fed, atol=1e-6)


def test_a_description_holds_every_parameter_of_the_augmentation_but_not_its_seed() -> None:
    augment = train_transforms()
    described = describe_transform(augment)
    seed_transform(augment, 123)
    augment(image=random_image())
    assert describe_transform(augment) == described  # seeding and use change nothing
    assert [t["__class_fullname__"] for t in described["transforms"]] == [
        "HorizontalFlip", "Affine", "CoarseDropout", "Normalize", "ToTensorV2"]
    assert described["transforms"][1]["rotate"] == [-15.0, 15.0]  # JSON: tuples as lists
    assert describe_transform(train_transforms(rotate=10.0)) != described
    assert describe_transform(None) is None
    assert describe_transform(normalize_images) == "normalize_images"  # any other callable
