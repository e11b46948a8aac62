"""Datasets read image by image from folders of JPEGs: ImageNet-1k and Tiny-ImageNet, never downloaded.

Unlike the 32x32 sets of ``kdbench.data``, these do not fit in memory: a ``FolderData`` holds the file paths and
labels, and ``kdbench.folder_loader`` decodes and augments them batch by batch. Class order is the sorted wnids (as
torchvision's ImageFolder and mdistiller have it), so weights trained there evaluate correctly here.

Input pipelines, as the anchors have them:

- ImageNet (torchvision's ``references/classification`` and mdistiller's ``dataset/imagenet.py``): training takes
  RandomResizedCrop(224) and a horizontal flip; evaluation resizes the short side to 256 and centre-crops 224.
  A smaller ``image_size`` scales both (crop s, resize round(s·256/224)), for tests and quick checks.
- Tiny-ImageNet (mdistiller's ``dataset/tiny_imagenet.py``, behind its DOT configs): training takes
  RandomRotation(20) and a horizontal flip of the 64x64 image; evaluation takes the image as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import functional as F

from kdbench.data import DatasetInfo, dataset_info, default_data_dir, register_dataset
from kdbench.errors import KdbenchError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_CROP, IMAGENET_RESIZE = 224, 256
TINY_SIZE = 64


@dataclass(frozen=True)
class Augmentation:
    """One training image's random draw: ImageNet's crop box (top, left, height, width) or Tiny-ImageNet's rotation
    angle, and whether it is flipped."""

    box: tuple[int, int, int, int] | None = None
    angle: float | None = None
    flip: bool = False


@dataclass(frozen=True)
class Pipeline:
    """How a folder dataset's images become model inputs (uint8, before normalisation), at a given input size.

    The random draw (``draw``) is apart from its application (``augment``), so both backends crop and flip alike:
    the draw is torchvision's own (RandomResizedCrop's ``get_params``, then the flip; RandomRotation's, then the
    flip), in the order its ``Compose`` makes it, from torch's global generator; ``augment`` and ``evaluate`` apply
    torchvision's functional ops, which take a PIL image (the CPU backend) or a C x H x W tensor on any device."""

    kind: str  # "imagenet" or "tiny-imagenet"
    size: int  # the side of the model's input

    def draw(self, height: int, width: int) -> Augmentation:
        """A training image's augmentation, for an image of this size (before any resize)."""
        if self.kind == "imagenet":
            box = T.RandomResizedCrop.get_params(torch.empty(0, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
            return Augmentation(box=tuple(box), flip=bool(torch.rand(1) < 0.5))
        angle = T.RandomRotation.get_params([-20.0, 20.0])
        return Augmentation(angle=angle, flip=bool(torch.rand(1) < 0.5))

    def augment(self, image, augmentation: Augmentation):
        """``image`` (PIL or tensor) as training sees it under ``augmentation``."""
        if augmentation.box is not None:
            image = F.resized_crop(image, *augmentation.box, [self.size, self.size], antialias=True)
        else:
            image = F.rotate(self._resized(image), augmentation.angle)
        return F.hflip(image) if augmentation.flip else image

    def evaluate(self, image):
        """``image`` (PIL or tensor) as evaluation sees it."""
        if self.kind == "imagenet":
            resized = F.resize(image, [round(self.size * IMAGENET_RESIZE / IMAGENET_CROP)], antialias=True)
            return F.center_crop(resized, [self.size])
        return self._resized(image)

    def _resized(self, image):
        """Tiny-ImageNet's images are 64x64: resized only for a smaller input (mdistiller takes them as they are)."""
        return F.resize(image, [self.size], antialias=True) if self.size != TINY_SIZE else image


@dataclass(frozen=True)
class FolderData:
    """A folder dataset's files and labels (train: the training split; test: the official validation split, what
    the field reports), and its pipeline at the default input size."""

    info: DatasetInfo
    train_paths: tuple[str, ...]
    train_y: torch.Tensor
    test_paths: tuple[str, ...]
    test_y: torch.Tensor
    classes: tuple[str, ...]
    pipeline: Pipeline

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """C x H x W of one model input at the default size: what models are probed with (feature shapes, MACs)."""
        return (3, self.pipeline.size, self.pipeline.size)


def _image_files(folder: Path) -> list[tuple[str, int]]:
    """(path, class index) of every image under ``folder``'s class subfolders (sorted names), as ImageFolder."""
    return make_dataset(str(folder), find_classes(str(folder))[1], extensions=IMG_EXTENSIONS)


def _first_with(root: Path, names: tuple[str, ...], required: tuple[str, ...]) -> Path | None:
    for candidate in (*(root / n for n in names), root):
        if all((candidate / r).is_dir() for r in required):
            return candidate
    return None


def _labels(samples: list[tuple[str, int]]) -> tuple[tuple[str, ...], torch.Tensor]:
    return tuple(p for p, _ in samples), torch.tensor([y for _, y in samples], dtype=torch.int64)


IMAGENET_LAYOUT = ("the ImageFolder layout train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (as torchvision's ImageNet "
                   "reference and mdistiller expect; valprep.sh sorts the validation images into wnid folders)")


def load_imagenet(data_dir: Path | None = None, download: bool = True) -> FolderData:
    """ImageNet-1k from ``data_dir`` (its ``imagenet/`` folder, or the folder itself). Never downloaded."""
    root = data_dir if data_dir is not None else default_data_dir()
    found = _first_with(root, ("imagenet", "ILSVRC2012"), ("train", "val"))
    if found is None:
        raise KdbenchError(f"imagenet not found: expected {IMAGENET_LAYOUT} under --data-dir; tried {root} and "
                           f"{root / 'imagenet'}")
    try:
        train_classes, _ = find_classes(str(found / "train"))
        val_classes, _ = find_classes(str(found / "val"))
        if train_classes != val_classes:
            raise KdbenchError(f"imagenet in {found}: train/ has {len(train_classes)} class folders and val/ has "
                               f"{len(val_classes)}, not the same wnids; expected {IMAGENET_LAYOUT}")
        train, test = _image_files(found / "train"), _image_files(found / "val")
    except (FileNotFoundError, OSError) as e:  # a class folder without images, or none at all
        raise KdbenchError(f"imagenet in {found} is malformed ({' '.join(str(e).split())}); expected "
                           f"{IMAGENET_LAYOUT}") from None
    return FolderData(dataset_info("imagenet"), *_labels(train), *_labels(test), tuple(train_classes),
                      Pipeline("imagenet", IMAGENET_CROP))


TINY_LAYOUT = ("the official tiny-imagenet-200 layout: train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
               "val/val_annotations.txt")


def load_tiny_imagenet(data_dir: Path | None = None, download: bool = True) -> FolderData:
    """Tiny-ImageNet from ``data_dir`` (its ``tiny-imagenet-200/`` folder, or the folder itself), the validation
    split labelled by ``val_annotations.txt``. Never downloaded."""
    root = data_dir if data_dir is not None else default_data_dir()
    found = _first_with(root, ("tiny-imagenet-200",), ("train", "val/images"))
    if found is None:
        raise KdbenchError(f"tiny-imagenet not found: expected {TINY_LAYOUT} under --data-dir; tried {root} and "
                           f"{root / 'tiny-imagenet-200'}")
    annotations = found / "val" / "val_annotations.txt"
    try:
        classes, index = find_classes(str(found / "train"))
        train = _image_files(found / "train")
        lines = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
    except (FileNotFoundError, OSError) as e:
        raise KdbenchError(f"tiny-imagenet in {found} is malformed ({' '.join(str(e).split())}); expected "
                           f"{TINY_LAYOUT}") from None
    test = []
    for number, fields in enumerate(lines, 1):
        path = found / "val" / "images" / fields[0]
        if len(fields) < 2 or fields[1] not in index or not path.is_file():
            raise KdbenchError(f"tiny-imagenet: line {number} of {annotations} names "
                               f"{'a missing image' if len(fields) > 1 and fields[1] in index else 'an unknown wnid'}"
                               f" ({fields[:2]}); expected {TINY_LAYOUT}")
        test.append((str(path), index[fields[1]]))
    return FolderData(dataset_info("tiny-imagenet"), *_labels(train), *_labels(test), tuple(classes),
                      Pipeline("tiny-imagenet", TINY_SIZE))


register_dataset(DatasetInfo(
    name="imagenet", num_classes=1000, in_channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    how_to_get=f"Never downloaded: put ImageNet-1k in {IMAGENET_LAYOUT} under the data dir (or its imagenet/ "
               "folder) and pass --data-dir.",
    load=load_imagenet, train_size=1_281_167, test_size=50_000, image_size=IMAGENET_CROP, views=(), from_files=True,
))
register_dataset(DatasetInfo(
    name="tiny-imagenet", num_classes=200, in_channels=3,
    # mdistiller's dataset/tiny_imagenet.py statistics
    mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262),
    how_to_get=f"Never downloaded: extract tiny-imagenet-200.zip ({TINY_LAYOUT}) into the data dir and pass "
               "--data-dir.",
    load=load_tiny_imagenet, train_size=100_000, test_size=10_000, image_size=TINY_SIZE, views=(), from_files=True,
))
