"""A device-resident loader with replayable on-device augmentation.

Design (data kept on the device as in KellerJordan/cifar10-airbench and tysam-code/hlb-CIFAR10; augmentation of
HobbitLong/RepDistiller ``dataset/cifar100.py``): the whole dataset lives on the device, the training set is
zero-padded once in pixel space, and each batch is cropped and flipped by one integer gather.  This reproduces
torchvision's ``RandomCrop(32, padding=4) -> RandomHorizontalFlip() -> ToTensor() -> Normalize`` exactly,
without DataLoader workers or host synchronisation.  Every random stream is a pure function of (seed, epoch, stream
name), and augmentation parameters are indexed by dataset index, so two runs with the same seed see identical views
whatever their batch size, subset or method.
"""

from __future__ import annotations

import copy
import hashlib
from typing import TYPE_CHECKING, Any, Iterator

import torch

from kdbench import augment
from kdbench.data import IMAGE_SIZE, PAD, ArrayData, DatasetInfo
from kdbench.distributed import World
from kdbench.errors import KdbenchError

if TYPE_CHECKING:
    from kdbench.spec import RunSpec

#: Augmented views a method may ask for beside the standard one (Method.views).
VIEWS = DatasetInfo.views
#: Seed of the fixed training subset: a constant, so every run and method trains on the same images.
SUBSET_SEED = 20240601
#: Seed of the fixed validation split, held out of the training set before the training subset is drawn.
VALIDATION_SEED = 20261206


def stream_seed(seed: int, epoch: int, stream: str) -> int:
    """Counter-based 63-bit seed of one random stream, so no stream's state depends on what others consumed."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(seed: int, epoch: int, stream: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(stream_seed(seed, epoch, stream))


def _fixed_subset(n: int, size: int | None, what: str, seed: int = SUBSET_SEED) -> torch.Tensor:
    """Sorted indices of a fixed subset (the same for every run and seed), or all ``n`` when ``size`` is None."""
    if size is None:
        return torch.arange(n)
    if not 1 <= size <= n:
        raise KdbenchError(f"a subset of {what} must hold between 1 and {n} images, got {size}")
    fixed = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=fixed)[:size].sort().values


def split_training_set(n: int, train_subset: int | None, val_split: int | None,
                       what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, validation indices) of a training set of ``n`` images: ``val_split`` images held out as a
    fixed validation split (the same for every run, seed and recipe), then the fixed training subset drawn from the
    rest. Without a split, the training subset is the one kdbench has always drawn."""
    held_out = (_fixed_subset(n, val_split, what, VALIDATION_SEED) if val_split
                else torch.zeros(0, dtype=torch.long))
    rest = torch.ones(n, dtype=torch.bool)
    rest[held_out] = False
    pool = rest.nonzero().squeeze(1)
    rest_of = f"{what} without its validation split" if val_split else what
    return pool[_fixed_subset(len(pool), train_subset, rest_of)], held_out


def make_loader(data, device: torch.device | str, *, image_size: int | None = None, backend: str | None = None,
                **options):
    """The loader for ``data``: whole 32x32 datasets on the device (DeviceLoader), folder datasets decoded by
    ``backend`` (``kdbench.folder_loader.FolderLoader``); ``options`` as both take them."""
    if isinstance(data, ArrayData):
        if image_size is not None and image_size != IMAGE_SIZE:
            raise KdbenchError(f"{data.info.name} images are {IMAGE_SIZE}x{IMAGE_SIZE}; --image-size is for imagenet "
                               f"and tiny-imagenet")
        if backend is not None:
            raise KdbenchError(f"{data.info.name} is held whole on the run's device; --data-backend is for imagenet "
                               f"and tiny-imagenet")
        return DeviceLoader(data, device, **options)
    from kdbench.folder_loader import FolderLoader

    return FolderLoader(data, device, image_size=image_size, backend=backend, **options)


def run_loader(spec: RunSpec, data, device: torch.device | str, full_batches: bool, world: World | None = None):
    """The loader ``spec``'s run trains and evaluates with (and a dry run prices, in one process at the global
    batch); ``full_batches``: its method needs every batch full (Method.needs_full_batches), so the last, short one
    is dropped. In ``world``, a process group that trains the run, each process takes its share of each batch."""
    recipe = spec.recipe
    loader = make_loader(data, device, batch_size=recipe.batch_size, channels_last=spec.channels_last,
                         train_subset=recipe.train_images(len(data.train_y)),
                         test_subset=recipe.test_images(len(data.test_y)), drop_last=recipe.drop_last or full_batches,
                         pad_mode=recipe.pad_mode, val_split=recipe.val_split, image_size=recipe.image_size,
                         backend=spec.data_backend)
    if world is not None:
        if world.size != (spec.world_size or 1):
            raise KdbenchError(f"{spec.run_id} is trained by {spec.world_size or 1} process(es), and this process "
                               f"group has {world.size}; give --gpus-per-run {world.size}, or launch "
                               f"{spec.world_size or 1}")
        loader.rank, loader.ranks = world.rank, world.size
    return loader


def input_shape(data, image_size: int | None) -> tuple[int, int, int]:
    """C x H x W of a model input: the dataset's, or a folder dataset's at ``image_size``."""
    return data.image_shape if image_size is None else (data.image_shape[0], image_size, image_size)


class BatchCounts:
    """What an epoch of a loader holds, from its ``subset``, ``batch_size`` and ``drop_last``."""

    subset: torch.Tensor
    batch_size: int
    drop_last: bool
    # This process's share of each training batch in a run across processes (kdbench.distributed): positions rank,
    # rank + ranks, ... of the batch, as DistributedSampler deals an epoch; one process takes every position.
    rank: int = 0
    ranks: int = 1

    def mine(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[self.rank::self.ranks]

    def whole(self):
        """This loader taking every position of each batch, as one process does: what a method's offline fit sees
        in a run across processes (it fits once, on rank 0)."""
        whole = copy.copy(self)
        whole.rank, whole.ranks = 0, 1
        return whole

    @property
    def num_train(self) -> int:
        return self.subset.shape[0]

    @property
    def steps_per_epoch(self) -> int:
        n, b = self.num_train, self.batch_size
        return n // b if self.drop_last else -(-n // b)


class DeviceLoader(BatchCounts):
    """Whole dataset resident on `device`; shuffling + augmentation in batches on the device.

    Reproduces torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize exactly, with
    one integer gather per batch and no host synchronisation.
    """

    def __init__(self, data: ArrayData, device: torch.device | str, *, batch_size: int,
                 train_subset: int | None = None, test_subset: int | None = None, drop_last: bool = False,
                 channels_last: bool = False, eval_batch_size: int = 1000, pad_mode: str = "zeros",
                 val_split: int | None = None):
        if batch_size < 1 or eval_batch_size < 1:
            raise KdbenchError(f"batch sizes must be >= 1, got batch_size={batch_size}, "
                               f"eval_batch_size={eval_batch_size}")
        self.info = data.info
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.drop_last = drop_last
        self.channels_last = channels_last
        n_full = data.train_x.shape[0]
        self.num_full_train = n_full

        subset, held_out = split_training_set(n_full, train_subset, val_split, f"the {self.info.name} training set")
        self.subset = subset.to(self.device)

        self._mean = torch.tensor(self.info.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(self.info.std, dtype=torch.float32, device=self.device)
        # Padded once in pixel space (as torchvision pads before ToTensor: zeros, or letKD's padding_mode="reflect")
        # and stored N x 40 x 40 x C, so a batch gather reads whole pixels and its NCHW view already has
        # channels_last strides. Reflection is not defined on uint8; the float round trip is exact.
        train = data.train_x.to(self.device)
        if pad_mode == "reflect":
            padded = torch.nn.functional.pad(train.float(), (PAD,) * 4, mode="reflect").to(torch.uint8)
        elif pad_mode == "zeros":
            padded = torch.nn.functional.pad(train, (PAD,) * 4)
        else:
            raise KdbenchError(f"unknown pad mode {pad_mode!r}; valid: zeros, reflect")
        self.train_pad = padded.permute(0, 2, 3, 1).contiguous()
        self.train_y = data.train_y.to(self.device)
        test_idx = _fixed_subset(data.test_x.shape[0], test_subset, f"the {self.info.name} test set")
        self.test_x, self.test_y = self._plain(data.test_x[test_idx]), data.test_y[test_idx].to(self.device)
        # The validation split: training images, never trained on, evaluated as the test set is (no augmentation).
        self.val_x, self.val_y = self._plain(data.train_x[held_out]), data.train_y[held_out].to(self.device)

    def _plain(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images on the device, normalised, in the run's layout: what evaluation reads."""
        x = images.to(self.device).float().div_(255)
        return self._layout(x.sub_(self._mean[:, None, None]).div_(self._std[:, None, None]))

    @property
    def has_validation(self) -> bool:
        return self.val_y.shape[0] > 0

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def aug_params(self, seed: int, epoch: int, stream: str = "aug") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CPU tensors (i, j, flip), one entry per dataset index: crop offsets uniform on 0..8, flip with p=0.5."""
        g = _generator(seed, epoch, stream)
        n = self.num_full_train
        i = torch.randint(0, 2 * PAD + 1, (n,), generator=g)
        j = torch.randint(0, 2 * PAD + 1, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        return i, j, flip

    def crop(self, idx, crop_i, crop_j, flip) -> torch.Tensor:
        """Crop + flip of the training images at dataset indices ``idx`` in one integer gather: uint8, B x 32 x 32 x C.

        ``crop_i``, ``crop_j`` (offsets into the 40x40 padded image) and ``flip`` are aligned with ``idx``.
        """
        dev = self.device
        idx, crop_i, crop_j, flip = (torch.as_tensor(t, device=dev) for t in (idx, crop_i, crop_j, flip))
        ar = torch.arange(IMAGE_SIZE, device=dev)
        rows = crop_i[:, None] + ar
        cols = torch.where(flip.bool()[:, None], crop_j[:, None] + (IMAGE_SIZE - 1) - ar, crop_j[:, None] + ar)
        return self.train_pad[idx[:, None, None], rows[:, :, None], cols[:, None, :]]

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 B x H x W x C to the model's input: the same operation order as ToTensor (x / 255) then Normalize
        ((x - mean) / std), so results match torchvision bit for bit, in the run's layout."""
        xb = pixels.float().div_(255).sub_(self._mean).div_(self._std)
        return self._layout(xb.permute(0, 3, 1, 2))

    def augment(self, idx, crop_i, crop_j, flip) -> torch.Tensor:
        """Crop + flip + normalise the training images at dataset indices ``idx``."""
        return self.normalise(self.crop(idx, crop_i, crop_j, flip))

    def strong(self, idx, crop_i, crop_j, flip, params: augment.RandAugmentParams) -> torch.Tensor:
        """The strong view (MLKD's): crop + flip, then RandAugment(2) + Cutout on the uint8 pixels
        (``kdbench.augment``), then normalise; ``params`` aligned with ``idx``."""
        pixels = self.crop(idx, crop_i, crop_j, flip).permute(0, 3, 1, 2)
        return self.normalise(augment.rand_augment(pixels, params).permute(0, 2, 3, 1))

    def train_epoch(self, seed: int, epoch: int, positions: bool = False,
                    views: tuple[str, ...] = ()) -> Iterator[tuple[Any, ...]]:
        """Batches of (augmented normalised images, labels) in this epoch's replayable order; with ``positions``,
        also each sample's position in the training subset (its dataset index when there is no subset); with
        ``views`` (names in VIEWS), last a dict of each view's images of the same samples, augmented apart with
        random streams of their own."""
        unknown = set(views) - set(VIEWS)
        if unknown:
            raise KdbenchError(f"unknown augmented view(s) {', '.join(sorted(unknown))}; valid: {', '.join(VIEWS)}")
        perm = torch.randperm(self.num_train, generator=_generator(seed, epoch, "perm")).to(self.device)
        order = self.subset[perm]
        ai, aj, af = (t.to(self.device) for t in self.aug_params(seed, epoch))
        if views:  # the strong view's own crop and flip, and its RandAugment draws, per dataset index
            si, sj, sf = (t.to(self.device) for t in self.aug_params(seed, epoch, "aug-strong"))
            drawn = augment.draw(_generator(seed, epoch, "randaugment"), self.num_full_train)
        b = self.batch_size
        for k in range(self.steps_per_epoch):
            idx = self.mine(order[k * b:(k + 1) * b])
            batch = self.augment(idx, ai[idx], aj[idx], af[idx]), self.train_y[idx]
            if positions:
                batch = (*batch, self.mine(perm[k * b:(k + 1) * b]))
            if views:
                on_cpu = idx.cpu()
                batch = (*batch, {"strong": self.strong(idx, si[idx], sj[idx], sf[idx], drawn.take(on_cpu))})
            yield batch

    def train_plain(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every image of the training subset once, in order, un-augmented (the unshifted, unflipped crop), in
        chunks of ``eval_batch_size``: what offline fits on teacher features see (letKD's reference pass)."""
        for k in range(0, self.num_train, self.eval_batch_size):
            idx = self.subset[k:k + self.eval_batch_size]
            centre = torch.full_like(idx, PAD)
            yield self.augment(idx, centre, centre, torch.zeros_like(idx, dtype=torch.bool)), self.train_y[idx]

    def test_batches(self, split: str = "test") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The normalised test set, or with ``split="val"`` the validation split (no augmentation), in chunks of
        ``eval_batch_size``."""
        x, y = (self.val_x, self.val_y) if split == "val" else (self.test_x, self.test_y)
        for k in range(0, x.shape[0], self.eval_batch_size):
            yield x[k:k + self.eval_batch_size], y[k:k + self.eval_batch_size]
