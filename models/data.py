"""Real-data loaders that read installed files only (nothing is ever downloaded).

Every loader returns numpy arrays: float32 images in [0, 1] with shape (N, 1, H, W), and either
int64 class labels (classification) or float32 high-resolution targets (super-resolution).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Split = Literal["train", "test"]
DatasetName = Literal["digits", "fashion_mnist", "sr"]
DATASETS: tuple[str, ...] = ("digits", "fashion_mnist", "sr")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

SR_SCALE = 2
SR_HR_PATCH = 64  # HR crop / tile side; the LR input is SR_HR_PATCH // SR_SCALE = 32
SR_TRAIN_CROPS = 2048
SR_CROP_SEED = 0
# Training and held-out images are disjoint; all ship with scikit-image / scikit-learn.
SR_TRAIN_IMAGES = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
    "moon", "brick", "grass", "gravel", "clock",
)
SR_TEST_IMAGES = ("sklearn:china.jpg", "sklearn:flower.jpg", "camera", "coins")


class DatasetMissingError(FileNotFoundError):
    """An installed dataset file is missing."""


def _read_idx_gz(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST container format): big-endian header, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#010x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: payload has {data.size} bytes, header says {dims}")
    return data.reshape(dims)


def load_fashion_mnist(split: Split, root: Path | str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from the Debian package `dataset-fashion-mnist` (60k train / 10k test).

    Returns images float32 (N, 1, 28, 28) in [0, 1] and labels int64 (N,) in 0..9.
    """
    root = Path(root)
    prefix = {"train": "train", "test": "t10k"}[split]
    image_path = root / f"{prefix}-images-idx3-ubyte.gz"
    label_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (image_path, label_path):
        if not path.is_file():
            raise DatasetMissingError(
                f"Fashion-MNIST file {path} not found. It comes from a Debian package: "
                f"run `sudo apt-get install dataset-fashion-mnist`."
            )
    images = _read_idx_gz(image_path).astype(np.float32)[:, None] / 255.0
    labels = _read_idx_gz(label_path).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels for split {split!r}")
    return images, labels


def load_digits_split(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits with a fixed stratified 80/20 split (1437 train / 360 test).

    Returns images float32 (N, 1, 8, 8) in [0, 1] (pixel values 0..16 divided by 16) and labels int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    return (x_train, y_train) if split == "train" else (x_test, y_test)


def _to_8bit_grid(x: np.ndarray) -> np.ndarray:
    """Round to the k/255 grid of an 8-bit image, so the network's 8-bit input quantizer is lossless."""
    return (np.round(np.clip(x, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def _load_gray_image(name: str) -> np.ndarray:
    """One bundled image as float32 luminance in [0, 1] (H, W). `sklearn:<file>` names a sample image."""
    from skimage.color import rgb2gray

    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        rgb = load_sample_image(name.removeprefix("sklearn:"))
    else:
        import skimage.data

        rgb = getattr(skimage.data, name)()
    image = rgb2gray(rgb[..., :3]) if rgb.ndim == 3 else rgb.astype(np.float64) / 255.0
    return _to_8bit_grid(image)


def downscale(hr: np.ndarray, factor: int = SR_SCALE) -> np.ndarray:
    """Antialiased bicubic downscaling (like MATLAB/PIL imresize) of (N, 1, H, W), kept on the 8-bit grid."""
    lr = F.interpolate(
        torch.from_numpy(hr), scale_factor=1.0 / factor, mode="bicubic", antialias=True, align_corners=False
    )
    return _to_8bit_grid(lr.numpy())


def bicubic_upscale(lr: np.ndarray, factor: int = SR_SCALE) -> np.ndarray:
    """Bicubic upscaling of (N, 1, h, w) clipped to [0, 1]: the baseline the SR network must beat."""
    hr = F.interpolate(torch.from_numpy(lr), scale_factor=factor, mode="bicubic", align_corners=False)
    return hr.clamp(0.0, 1.0).numpy()


def _random_crops(images: list[np.ndarray], count: int, size: int, seed: int) -> np.ndarray:
    """`count` crops of size x size from images chosen uniformly, with random flips / 90-degree turns."""
    rng = np.random.default_rng(seed)
    crops = np.empty((count, 1, size, size), dtype=np.float32)
    for i in range(count):
        image = images[rng.integers(len(images))]
        top = rng.integers(image.shape[0] - size + 1)
        left = rng.integers(image.shape[1] - size + 1)
        crop = image[top: top + size, left: left + size]
        if rng.integers(2):
            crop = crop[:, ::-1]
        crops[i, 0] = np.rot90(crop, k=int(rng.integers(4)))
    return crops


def _tiles(image: np.ndarray, size: int) -> np.ndarray:
    """Non-overlapping size x size tiles covering the top-left part of the image divisible by size."""
    rows, cols = image.shape[0] // size, image.shape[1] // size
    cropped = image[: rows * size, : cols * size]
    return cropped.reshape(rows, size, cols, size).transpose(0, 2, 1, 3).reshape(-1, 1, size, size)


def load_super_resolution(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """x2 super-resolution pairs (LR, HR) on luminance, float32 in [0, 1] on the 8-bit grid.

    train: SR_TRAIN_CROPS fixed random 64x64 HR crops (flips/turns) of SR_TRAIN_IMAGES.
    test: every 64x64 HR tile of the held-out SR_TEST_IMAGES (different images).
    LR is the antialiased bicubic x2 downscale of each HR patch: LR (N, 1, 32, 32), HR (N, 1, 64, 64).
    """
    if split == "train":
        hr = _random_crops([_load_gray_image(n) for n in SR_TRAIN_IMAGES], SR_TRAIN_CROPS, SR_HR_PATCH, SR_CROP_SEED)
    else:
        hr = np.concatenate([_tiles(_load_gray_image(n), SR_HR_PATCH) for n in SR_TEST_IMAGES])
    return downscale(hr), hr


def load_dataset(name: DatasetName, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch by dataset name: 'digits', 'fashion_mnist' (inputs, labels) or 'sr' (LR, HR)."""
    loaders = {"digits": load_digits_split, "fashion_mnist": load_fashion_mnist, "sr": load_super_resolution}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    return loaders[name](split)
