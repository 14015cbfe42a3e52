"""Image augmentation and normalisation: every albumentations call in the project lives here.

Swapping the backend (say, to torchvision.transforms.v2) is a change to this file alone.
Transforms take an HxWx3 uint8 image and return a normalised 3xHxW float tensor.
"""

from __future__ import annotations

import json
import os

# albumentations 2.x asks PyPI for a newer release on import; offline that only costs time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

# Per-channel statistics of the 50,000 CIFAR-10 training images, on the 0..1 scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# The brief's cutout: one 16x16 hole. albumentations casts `fill` to the image dtype, so on
# uint8 images it must be in pixel units: (125, 123, 114), the mean colour. A 0..1 mean would
# be cast to 0, a black hole, which is what the starting repo shipped.
HOLE_SIZE = 16
MEAN_PIXEL = tuple(round(255 * m) for m in CIFAR10_MEAN)


def _normalize_to_tensor() -> list[A.BasicTransform]:
    """Scale uint8 to 0..1, standardise per channel, HWC -> CHW float tensor."""
    return [A.Normalize(mean=CIFAR10_MEAN, std=CIFAR10_STD, max_pixel_value=255.0), ToTensorV2()]


def train_transforms(
    flip_p: float = 0.5,
    shift: float = 0.0625,
    scale: float = 0.1,
    rotate: float = 15.0,
    affine_p: float = 0.5,
    cutout_p: float = 0.5,
) -> A.Compose:
    """The brief's augmentation: horizontal flip, shift-scale-rotate, one 16x16 mean-colour hole.

    Args:
        flip_p: probability of a horizontal flip (0.5: a mirrored CIFAR image is as likely).
        shift: largest translation, as a fraction of the side (0.0625 = 2 px on 32 px).
        scale: largest zoom in or out, as a fraction (0.1 = 90%..110%).
        rotate: largest rotation in degrees.
        affine_p: probability of applying the shift-scale-rotate.
        cutout_p: probability of cutting the 16x16 hole.

    Shift-scale-rotate is written as `A.Affine`: in albumentations 2.x `ShiftScaleRotate` is a
    deprecated special case of it. Pixels uncovered by the affine are reflected, not black.
    """
    return A.Compose(
        [
            A.HorizontalFlip(p=flip_p),
            A.Affine(
                translate_percent=(-shift, shift),
                scale=(1.0 - scale, 1.0 + scale),
                rotate=(-rotate, rotate),
                border_mode=cv2.BORDER_REFLECT_101,
                p=affine_p,
            ),
            A.CoarseDropout(
                num_holes_range=(1, 1),
                hole_height_range=(HOLE_SIZE, HOLE_SIZE),
                hole_width_range=(HOLE_SIZE, HOLE_SIZE),
                fill=MEAN_PIXEL,
                p=cutout_p,
            ),
            *_normalize_to_tensor(),
        ]
    )


def eval_transforms() -> A.Compose:
    """Deterministic evaluation transform: normalise and convert to a tensor."""
    return A.Compose(_normalize_to_tensor())


def describe_transform(transform: object) -> object:
    """A JSON-ready description of an augmentation: each transform and its parameters.

    Pipelines described alike augment alike for the same seed (the seed is not part of it).
    Any other callable is described by its name alone (a function's, else its type's).
    """
    if transform is None:
        return None
    if isinstance(transform, (A.BaseCompose, A.BasicTransform)):
        description = A.to_dict(transform)["transform"]
    else:
        description = getattr(transform, "__qualname__", type(transform).__qualname__)
    return json.loads(json.dumps(description, default=repr))  # tuples as lists, as JSON has them


def seed_transform(transform: object, seed: int) -> None:
    """Reset an augmentation pipeline's own random state (albumentations ignores global seeds)."""
    if isinstance(transform, A.BaseCompose):
        transform.set_random_seed(seed)


def _channel_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation's mean and std as 3x1x1 tensors, broadcasting over CHW and NCHW."""
    return torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)


def normalize_images(images: np.ndarray) -> torch.Tensor:
    """N x 32 x 32 x 3 uint8 images as `eval_transforms` feeds them to a net, as one NCHW tensor."""
    mean, std = _channel_stats()
    return (torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2) - mean) / std


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Undo the normalisation of a 3xHxW tensor: an HxWx3 float image in [0, 1] for imshow."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"denormalize expects one 3xHxW image tensor; got {tuple(image.shape)}")
    mean, std = _channel_stats()
    restored = image.detach().float().cpu() * std + mean
    return restored.clamp(0.0, 1.0).permute(1, 2, 0).numpy()
