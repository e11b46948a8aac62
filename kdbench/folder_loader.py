"""Batches of a folder dataset (``kdbench.folder_data``): JPEGs decoded and augmented by DataLoader workers on the
CPU (Pillow, libjpeg-turbo), normalised on the device. The same interface as ``kdbench.loader.DeviceLoader``.

Determinism: each training image's augmentation (ImageNet's crop box and flip, Tiny-ImageNet's rotation and flip)
is drawn from a random stream of its own, seeded by (run seed, epoch, dataset index) (``loader.stream_seed``), and
each epoch's order from the (seed, epoch) "perm" stream, as the device loader draws them. So a run sees the same
images whatever its batch size, worker count or subset, and a resumed run, which restarts the epoch it stopped in,
replays it exactly. The torchvision transforms draw from torch's global generator, which each image's draw forks and
seeds (``torch.random.fork_rng``), so neither the workers' nor the trainer's random state matters.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from kdbench.errors import KdbenchError
from kdbench.folder_data import FolderData, Pipeline
from kdbench.loader import BatchCounts, _fixed_subset, _generator, split_training_set, stream_seed


def default_workers() -> int:
    """Decoding processes: the cores this process may use but one (the trainer's), at most 8; 0 on one core."""
    return min(8, max(0, len(os.sched_getaffinity(0)) - 1))


class _Images(Dataset):
    """Items are (dataset index, seed, epoch): a training image augmented from its own stream, or with seed None
    the image as evaluation sees it. Returns (uint8 C x H x W, index)."""

    def __init__(self, paths: tuple[str, ...], pipeline: Pipeline):
        self.paths = paths
        self.train, self.eval = pipeline.train(), pipeline.eval()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int | None, int]) -> tuple[torch.Tensor, int]:
        index, seed, epoch = item
        try:
            with Image.open(self.paths[index]) as file:
                image = file.convert("RGB")
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise KdbenchError(f"cannot read image {self.paths[index]} ({' '.join(str(e).split())})") from None
        if seed is None:
            return pil_to_tensor(self.eval(image)), index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(seed, epoch, f"aug:{index}"))
            return pil_to_tensor(self.train(image)), index


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # a decoding worker does not need intra-op threads; the trainer does


class FolderLoader(BatchCounts):
    """Training, validation and test batches of a folder dataset, normalised on ``device``."""

    def __init__(self, data: FolderData, device: torch.device | str, *, batch_size: int,
                 train_subset: int | None = None, test_subset: int | None = None, drop_last: bool = False,
                 channels_last: bool = False, eval_batch_size: int = 1000, pad_mode: str = "zeros",
                 val_split: int | None = None, image_size: int | None = None, workers: int | None = None):
        if batch_size < 1 or eval_batch_size < 1:
            raise KdbenchError(f"batch sizes must be >= 1, got batch_size={batch_size}, "
                               f"eval_batch_size={eval_batch_size}")
        if pad_mode != "zeros":
            raise KdbenchError(f"pad mode {pad_mode!r} applies to the 32x32 datasets' padded crop; "
                               f"{data.info.name} crops as its pipeline says")
        if image_size is not None and not 16 <= image_size <= data.pipeline.size:
            raise KdbenchError(f"image size {image_size} for {data.info.name}: give 16 to {data.pipeline.size}")
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
        self._train_images = _Images(data.train_paths, self.pipeline)
        self._test_idx = _fixed_subset(len(data.test_paths), test_subset, f"the {self.info.name} test set")
        self._test_images = _Images(data.test_paths, self.pipeline)
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
                            pin_memory=self.device.type == "cuda", generator=torch.Generator())
        for pixels, _ in loader:
            yield self._normalise(pixels)

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
        chunks = [(order[k * b:(k + 1) * b], perm[k * b:(k + 1) * b]) for k in range(self.steps_per_epoch)]
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
