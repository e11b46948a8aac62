"""Batches of a folder dataset (``kdbench.folder_data``), in two backends (``--data-backend``), with the same
interface as ``kdbench.loader.DeviceLoader``:

- ``cpu`` (the default): DataLoader workers decode (Pillow, libjpeg-turbo) and augment each image; the uint8 batch
  goes to the device through pinned memory and is normalised there.
- ``device``: workers only read each file's bytes; TorchCodec decodes the batch on the run's device (nvjpeg on
  CUDA, libjpeg-turbo on a CPU), and torchvision augments and normalises it there, so decoded pixels never cross
  the bus.

Both draw the same augmentation for an image (``Pipeline.draw``) and apply it with torchvision's functional ops, so
they differ only where the decoders do (nvjpeg against libjpeg-turbo) and where torchvision's tensor resize and
rotation round unlike Pillow's (at most one grey level for a resize; a rotation's nearest neighbour at a few edge
pixels). ``tests/test_imagefolder.py`` states the tolerances.

Determinism: each training image's augmentation (ImageNet's crop box and flip, Tiny-ImageNet's rotation and flip)
is drawn from a random stream of its own, seeded by (run seed, epoch, dataset index) (``loader.stream_seed``), and
each epoch's order from the (seed, epoch) "perm" stream, as the device loader draws them. So a run sees the same
images whatever its batch size, worker count or subset, and a resumed run, which restarts the epoch it stopped in,
replays it exactly. torchvision's draws use torch's global generator, which each image's draw forks and seeds
(``torch.random.fork_rng``), so neither the workers' nor the trainer's random state matters.
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms.functional import pil_to_tensor

from kdbench.errors import KdbenchError
from kdbench.folder_data import Augmentation, FolderData, Pipeline
from kdbench.loader import BatchCounts, _fixed_subset, _generator, split_training_set, stream_seed
from kdbench.spec import DATA_BACKENDS


def default_workers() -> int:
    """Decoding processes: the cores this process may use but one (the trainer's), at most 8; 0 on one core."""
    return min(8, max(0, len(os.sched_getaffinity(0)) - 1))


def _augmentation(pipeline: Pipeline, seed: int, epoch: int, index: int, height: int, width: int) -> Augmentation:
    """Training image ``index``'s draw in this epoch, from its own stream; torch's global state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, epoch, f"aug:{index}"))
        return pipeline.draw(height, width)


def _unreadable(path: str, error: Exception) -> KdbenchError:
    return KdbenchError(f"cannot read image {path} ({' '.join(str(error).split())})")


class _Images(Dataset):
    """The ``cpu`` backend. Items are (dataset index, seed, epoch): a training image augmented from its own stream,
    or with seed None the image as evaluation sees it. Returns (uint8 C x H x W, index)."""

    def __init__(self, paths: tuple[str, ...], pipeline: Pipeline):
        self.paths, self.pipeline = paths, pipeline

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int | None, int]) -> tuple[torch.Tensor, int]:
        index, seed, epoch = item
        try:
            with Image.open(self.paths[index]) as file:
                image = file.convert("RGB")
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise _unreadable(self.paths[index], e) from None
        if seed is None:
            return pil_to_tensor(self.pipeline.evaluate(image)), index
        augmentation = _augmentation(self.pipeline, seed, epoch, index, image.height, image.width)
        return pil_to_tensor(self.pipeline.augment(image, augmentation)), index

    collate = staticmethod(default_collate)

    @staticmethod
    def pixels(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> torch.Tensor:
        return batch[0]


def _as_list(batch: list) -> list:
    return batch


class _Files(_Images):
    """The ``device`` backend: a worker reads an image's bytes and, from its header's size, draws its augmentation
    (the same draw as the ``cpu`` backend's); ``pixels`` decodes and augments the batch on the device."""

    def __getitem__(self, item: tuple[int, int | None, int]) -> tuple[torch.Tensor, Augmentation | None, int]:
        index, seed, epoch = item
        try:
            raw = Path(self.paths[index]).read_bytes()
            with Image.open(io.BytesIO(raw)) as file:  # the header only
                width, height = file.size
        except OSError as e:
            raise _unreadable(self.paths[index], e) from None
        augmentation = None if seed is None else _augmentation(self.pipeline, seed, epoch, index, height, width)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8), augmentation, index

    collate = staticmethod(_as_list)

    def pixels(self, batch: list[tuple[torch.Tensor, Augmentation | None, int]], device: torch.device) -> torch.Tensor:
        files, augmentations, indices = zip(*batch)
        images = _decoded(list(files), [self.paths[i] for i in indices], device)
        return torch.stack([self.pipeline.evaluate(image) if augmentation is None
                            else self.pipeline.augment(image, augmentation)
                            for image, augmentation in zip(images, augmentations)])


def _decoded(files: list[torch.Tensor], paths: list[str], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes to RGB uint8 C x H x W on ``device``, by TorchCodec: nvjpeg for the whole batch on CUDA,
    libjpeg-turbo on the CPU. Files the batched decoder refuses (ImageNet's CMYK JPEGs, its PNG named .JPEG) are
    decoded one by one, on the CPU where the device's decoder cannot."""
    from torchcodec.decoders import decode_image, decode_jpeg

    try:
        return decode_jpeg(files, device=device)
    except RuntimeError:
        images = []
        for data, path in zip(files, paths):
            try:
                images.append(decode_jpeg(data, device=device))
            except RuntimeError:
                try:
                    images.append(decode_image(data).to(device))
                except RuntimeError as e:
                    raise _unreadable(path, e) from None
        return images


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # a decoding worker does not need intra-op threads; the trainer does


class FolderLoader(BatchCounts):
    """Training, validation and test batches of a folder dataset, normalised on ``device``."""

    def __init__(self, data: FolderData, device: torch.device | str, *, batch_size: int,
                 train_subset: int | None = None, test_subset: int | None = None, drop_last: bool = False,
                 channels_last: bool = False, eval_batch_size: int = 1000, pad_mode: str = "zeros",
                 val_split: int | None = None, image_size: int | None = None, workers: int | None = None,
                 backend: str | None = None):
        if batch_size < 1 or eval_batch_size < 1:
            raise KdbenchError(f"batch sizes must be >= 1, got batch_size={batch_size}, "
                               f"eval_batch_size={eval_batch_size}")
        if pad_mode != "zeros":
            raise KdbenchError(f"pad mode {pad_mode!r} applies to the 32x32 datasets' padded crop; "
                               f"{data.info.name} crops as its pipeline says")
        if image_size is not None and not 16 <= image_size <= data.pipeline.size:
            raise KdbenchError(f"image size {image_size} for {data.info.name}: give 16 to {data.pipeline.size}")
        if backend not in (None, *DATA_BACKENDS):
            raise KdbenchError(f"data backend {backend!r}: give one of {', '.join(DATA_BACKENDS)}")
        if backend == "device" and importlib.util.find_spec("torchcodec") is None:
            raise KdbenchError("--data-backend device decodes with TorchCodec, which is not installed: "
                               "pip install 'kdbench[codec]'")
        self.info = data.info
        self.device = torch.device(device)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.drop_last, self.channels_last = drop_last, channels_last
        self.workers = default_workers() if workers is None else workers
        self.pipeline = Pipeline(data.pipeline.kind, image_size or data.pipeline.size)
        self.num_full_train = len(data.train_paths)
        subset, held_out = split_training_set(self.num_full_train, train_subset, val_split,
                                              f"the {self.info.name} training set")
        self.subset, self._held_out = subset.to(self.device), held_out
        self.train_y = data.train_y.to(self.device)
        images = _Files if backend == "device" else _Images
        self._train_images = images(data.train_paths, self.pipeline)
        self._test_idx = _fixed_subset(len(data.test_paths), test_subset, f"the {self.info.name} test set")
        self._test_images = images(data.test_paths, self.pipeline)
        self.test_y = data.test_y[self._test_idx].to(self.device)
        self.val_y = data.train_y[held_out].to(self.device)
        self._mean = torch.tensor(self.info.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(self.info.std, dtype=torch.float32, device=self.device)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.pipeline.size, self.pipeline.size)

    @property
    def has_validation(self) -> bool:
        return len(self._held_out) > 0

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 B x C x H x W to the model's input: x / 255, then (x - mean) / std, as ToTensor and Normalize."""
        x = pixels.to(self.device, non_blocking=True).float().div_(255)
        x = x.sub_(self._mean[:, None, None]).div_(self._std[:, None, None])
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def _batches(self, images: _Images, batches: list[list[tuple[int, int | None, int]]]) -> Iterator[torch.Tensor]:
        # its own generator for the workers' base seed, which nothing here uses: torch's global one stays untouched
        loader = DataLoader(images, batch_sampler=batches, num_workers=self.workers, worker_init_fn=_one_thread,
                            collate_fn=images.collate, generator=torch.Generator(),
                            pin_memory=self.device.type == "cuda" and images.collate is default_collate)
        for batch in loader:
            yield self._normalise(images.pixels(batch, self.device))

    def train_epoch(self, seed: int, epoch: int, positions: bool = False,
                    views: tuple[str, ...] = ()) -> Iterator[tuple[Any, ...]]:
        """Batches of (augmented normalised images, labels) in this epoch's replayable order; with ``positions``,
        also each sample's position in the training subset."""
        if views:
            raise KdbenchError(f"augmented view(s) {', '.join(views)} are made for the 32x32 datasets only; "
                               f"{self.info.name} has its standard view")
        perm = torch.randperm(self.num_train, generator=_generator(seed, epoch, "perm"))
        order = self.subset.cpu()[perm]
        b = self.batch_size
        chunks = [(self.mine(order[k * b:(k + 1) * b]), self.mine(perm[k * b:(k + 1) * b]))
                  for k in range(self.steps_per_epoch)]
        batches = [[(int(i), seed, epoch) for i in idx] for idx, _ in chunks]
        for x, (idx, pos) in zip(self._batches(self._train_images, batches), chunks):
            batch = x, self.train_y[idx.to(self.device)]
            yield (*batch, pos.to(self.device)) if positions else batch

    def _evaluated(self, images: _Images, indices: torch.Tensor) -> Iterator[torch.Tensor]:
        size = self.eval_batch_size
        chunks = [[(int(i), None, 0) for i in indices[k:k + size]] for k in range(0, len(indices), size)]
        return self._batches(images, chunks)

    def train_plain(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every image of the training subset once, in order, as evaluation sees it, in chunks of
        ``eval_batch_size``: what offline fits on teacher features see."""
        subset = self.subset.cpu()
        for k, x in enumerate(self._evaluated(self._train_images, subset)):
            yield x, self.train_y[self.subset[k * self.eval_batch_size:(k + 1) * self.eval_batch_size]]

    def test_batches(self, split: str = "test") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The normalised test set, or with ``split="val"`` the validation split, in chunks of ``eval_batch_size``."""
        images, indices, labels = ((self._train_images, self._held_out, self.val_y) if split == "val"
                                   else (self._test_images, self._test_idx, self.test_y))
        for k, x in enumerate(self._evaluated(images, indices)):
            yield x, labels[k * self.eval_batch_size:(k + 1) * self.eval_batch_size]
