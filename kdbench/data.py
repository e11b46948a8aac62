"""Datasets as whole uint8 tensors: a registry of what each is (``DatasetInfo``) and how to get it (CIFAR,
Fashion-MNIST, CINIC-10, a generated set). ``kdbench.loader`` turns one into batches on the device."""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import pickle
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from kdbench.errors import KdbenchError
from kdbench.registry import Registry

if TYPE_CHECKING:
    from kdbench.folder_data import FolderData

IMAGE_SIZE = 32
PAD = 4
#: Where Debian's ``dataset-fashion-mnist`` package installs the idx files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetInfo:
    """What the harness needs to know about a dataset, and how to load it."""

    name: str
    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    how_to_get: str
    load: Callable[[Path | None, bool], "ArrayData | FolderData"]
    # Images in the training and test splits, known without loading, so a sweep is checked against them when it is
    # planned (subsets that hold a whole split, batches that no step can fill); None: unknown until loaded.
    train_size: int | None = None
    test_size: int | None = None
    image_size: int = 32  # the side of a model input (folder datasets: their pipeline's crop)
    # Augmented views its loader makes beside the standard one (Method.views): the device loader's for 32x32 data.
    views: tuple[str, ...] = ("strong",)
    # Read image by image from files (kdbench.folder_data), so a data backend (--data-backend) decodes them; the
    # 32x32 datasets are held whole on the run's device.
    from_files: bool = False


@dataclass(frozen=True)
class ArrayData:
    """The whole dataset as uint8 CPU tensors: images N x C x 32 x 32, labels int64."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def __post_init__(self):
        c = self.info.in_channels
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != (c, IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(f"{self.info.name} {split} images must be uint8 N x {c} x 32 x 32, "
                                 f"got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
                raise ValueError(f"{self.info.name} {split} labels must be int64 of length {x.shape[0]}, "
                                 f"got {y.dtype} {tuple(y.shape)}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """C x H x W of one image: what models are probed with (feature shapes, MACs)."""
        return tuple(self.train_x.shape[1:])


_DATASETS: Registry[DatasetInfo] = Registry("dataset")


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    """Make a dataset selectable by name (e.g. from the CLI and configs)."""
    return _DATASETS.add(info.name, info)


def dataset_info(name: str) -> DatasetInfo:
    """The registered dataset; unknown names raise a KdbenchError listing the valid ones."""
    return _DATASETS.get(name)


def list_datasets() -> list[str]:
    return _DATASETS.names()


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> ArrayData:
    """Load a dataset into CPU memory; ``data_dir=None`` means $KDBENCH_DATA_DIR or ~/.cache/kdbench/data."""
    info = dataset_info(name)
    return info.load(None if data_dir is None else Path(data_dir).expanduser(), download)


def default_data_dir() -> Path:
    env = os.environ.get("KDBENCH_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kdbench" / "data"


# Errors that mean "the download did not work": no network (URLError is an OSError), HTTP errors, a bad checksum
# (torchvision raises RuntimeError) or a broken archive.
_DOWNLOAD_ERRORS = (OSError, RuntimeError, tarfile.TarError, EOFError, zlib.error)


def _reason(e: BaseException) -> str:
    """An exception as one line, so KdbenchError messages stay one line."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


@contextlib.contextmanager
def _downloading_into(root: Path) -> Iterator[None]:
    """Removes the folders a download created on the way to ``root`` when it fails: a dataset that could not be
    fetched leaves nothing behind."""
    created = None
    for folder in (root, *root.parents):
        if folder.exists():
            break
        created = folder
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------- CIFAR (python pickles)


def _read_cifar_pickle(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR pickle: b'data' is N x 3072 uint8 rows holding the R, G and B 32x32 planes in row-major order."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise KdbenchError(f"{path} is not a valid CIFAR python pickle ({_reason(e)})") from None
    if data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE or labels.shape != (data.shape[0],):
        raise KdbenchError(f"{path} is malformed: data {data.shape}, labels {labels.shape}; "
                           f"expected N x 3072 and N labels")
    return data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE), labels


def _load_cifar(data_dir: Path | None, download: bool, *, name: str, tv_class, folder: str, label_key: bytes,
                num_classes: int, verify: bool = True) -> ArrayData:
    """Read CIFAR-10/100 from ``data_dir/folder`` in the original format, downloading the archive if allowed."""
    from torchvision.datasets.utils import check_integrity, download_and_extract_archive

    root = data_dir if data_dir is not None else default_data_dir()
    base = root / folder
    files = [(split, fname, md5) for split, lst in (("train", tv_class.train_list), ("test", tv_class.test_list))
             for fname, md5 in lst]
    if not all((base / fname).is_file() for _, fname, _ in files):
        how = (f"download {tv_class.filename} from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
               f"into {root}, or pass --data-dir")
        if not download:
            raise KdbenchError(f"{name} not found in {root} and downloading is disabled; {how}")
        try:
            with _downloading_into(root):
                download_and_extract_archive(tv_class.url, str(root), filename=tv_class.filename,
                                             md5=tv_class.tgz_md5)
        except _DOWNLOAD_ERRORS as e:
            raise KdbenchError(f"{name} not found in {root} and could not be downloaded "
                               f"({_reason(e)}); {how}") from None
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for split, fname, md5 in files:
        path = base / fname
        if verify and not check_integrity(str(path), md5):
            raise KdbenchError(f"{name}: checksum mismatch for {path} (file corrupt or not the original); "
                               f"delete {base} and download it again")
        parts[split].append(_read_cifar_pickle(path, label_key))
    (train_x, train_y), (test_x, test_y) = (
        (torch.from_numpy(np.concatenate([p[0] for p in parts[s]])),
         torch.from_numpy(np.concatenate([p[1] for p in parts[s]]))) for s in ("train", "test"))
    for y in (train_y, test_y):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise KdbenchError(f"{name} in {base} has labels outside 0..{num_classes - 1}")
    return ArrayData(dataset_info(name), train_x, train_y, test_x, test_y)


def load_cifar100(data_dir: Path | None = None, download: bool = True, *, verify: bool = True) -> ArrayData:
    """CIFAR-100 with fine labels; ``verify=False`` skips the md5 check (for self-written test files)."""
    from torchvision.datasets import CIFAR100

    return _load_cifar(data_dir, download, name="cifar100", tv_class=CIFAR100, folder="cifar-100-python",
                       label_key=b"fine_labels", num_classes=100, verify=verify)


def load_cifar10(data_dir: Path | None = None, download: bool = True, *, verify: bool = True) -> ArrayData:
    """CIFAR-10; ``verify=False`` skips the md5 check (for self-written test files)."""
    from torchvision.datasets import CIFAR10

    return _load_cifar(data_dir, download, name="cifar10", tv_class=CIFAR10, folder="cifar-10-batches-py",
                       label_key=b"labels", num_classes=10, verify=verify)


# ---------------------------------------------------------------------------------------------- Fashion-MNIST (idx .gz)

FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
_IDX_MAGIC = {1: 2049, 3: 2051}  # unsigned-byte idx files with 1 (labels) or 3 (images) dimensions


def _read_idx_gz(path: Path, ndim: int) -> np.ndarray:
    """Parse a gzipped unsigned-byte idx file, checking the magic number and that the size matches the header."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise KdbenchError(f"{path} is not a readable gzip file ({_reason(e)})") from None
    header = 4 * (ndim + 1)
    if len(raw) < header or int.from_bytes(raw[:4], "big") != _IDX_MAGIC[ndim]:
        raise KdbenchError(f"{path} is not an idx file with {ndim} dimension(s) (bad magic number)")
    shape = tuple(int.from_bytes(raw[4 * k:4 * k + 4], "big") for k in range(1, ndim + 1))
    if len(raw) - header != math.prod(shape):
        raise KdbenchError(f"{path} is truncated or malformed: header says {shape}, "
                           f"found {len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _fashion_dir(candidates: list[Path]) -> Path | None:
    """The first directory holding all four idx .gz files, directly or in torchvision's FashionMNIST/raw layout."""
    for d in candidates:
        for sub in (d, d / "FashionMNIST" / "raw"):
            if all((sub / f).is_file() for f in FASHION_FILES.values()):
                return sub
    return None


def load_fashion_mnist(data_dir: Path | None = None, download: bool = True) -> ArrayData:
    """Fashion-MNIST, 28x28 zero-padded by 2 to 32x32 so every CIFAR model works unchanged.

    Searched in ``data_dir`` (or the default data dir), then Debian's package location, then downloaded with
    torchvision.
    """
    root = data_dir if data_dir is not None else default_data_dir()
    found = _fashion_dir([root, DEBIAN_FASHION_MNIST_DIR])
    if found is None:
        how = ("run `apt-get install dataset-fashion-mnist`, or put the four idx .gz files in a folder "
               "and pass --data-dir")
        if not download:
            raise KdbenchError(f"fashion-mnist not found in {root} or {DEBIAN_FASHION_MNIST_DIR} "
                               f"and downloading is disabled; {how}")
        try:
            from torchvision.datasets import FashionMNIST

            with _downloading_into(root):
                FashionMNIST(str(root), train=True, download=True)
        except _DOWNLOAD_ERRORS as e:
            raise KdbenchError(f"fashion-mnist not found in {root} or {DEBIAN_FASHION_MNIST_DIR} and could not be "
                               f"downloaded ({_reason(e)}); {how}") from None
        found = _fashion_dir([root])
        if found is None:
            raise KdbenchError(f"fashion-mnist download into {root} left no idx .gz files; {how}")
    arrays = {}
    for split in ("train", "test"):
        x = _read_idx_gz(found / FASHION_FILES[f"{split}_x"], 3)
        y = _read_idx_gz(found / FASHION_FILES[f"{split}_y"], 1)
        if x.shape[1:] != (28, 28) or x.shape[0] != y.shape[0] or (y.size and y.max() > 9):
            raise KdbenchError(f"fashion-mnist {split} files in {found} are inconsistent: images {x.shape}, "
                               f"labels {y.shape} (expected N x 28 x 28 and N labels in 0..9)")
        padded = torch.zeros(x.shape[0], 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        padded[:, 0, 2:30, 2:30] = torch.from_numpy(x.copy())
        arrays[split] = (padded, torch.from_numpy(y.astype(np.int64)))
    return ArrayData(dataset_info("fashion-mnist"), *arrays["train"], *arrays["test"])


# ---------------------------------------------------------------------------------------------- synthetic

SYNTHETIC_SEED = 1234
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 640, 320


def load_synthetic(data_dir: Path | None = None, download: bool = True) -> ArrayData:
    """A tiny, learnable CIFAR-shaped dataset generated in memory, so the harness runs end to end offline.

    Each class is a smooth random template (8x8 noise upsampled to 36x36); an image is a random 32x32 window of its
    template (shift of 0..4 pixels) plus pixel noise, clipped to uint8.  Same output on every call.
    """
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    num_classes, big = 10, IMAGE_SIZE + 4
    low = torch.rand(num_classes, 3, 8, 8, generator=g)
    templates = 40 + 175 * torch.nn.functional.interpolate(low, size=(big, big), mode="bilinear", align_corners=True)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        di = torch.randint(0, big - IMAGE_SIZE + 1, (n,), generator=g)
        dj = torch.randint(0, big - IMAGE_SIZE + 1, (n,), generator=g)
        ar = torch.arange(IMAGE_SIZE)
        rows, cols = di[:, None] + ar, dj[:, None] + ar
        x = templates[y[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        x = x + 40 * torch.randn(x.shape, generator=g)
        return x.round().clamp(0, 255).to(torch.uint8).contiguous(), y

    train_x, train_y = split(SYNTHETIC_TRAIN)
    test_x, test_y = split(SYNTHETIC_TEST)
    return ArrayData(dataset_info("synthetic"), train_x, train_y, test_x, test_y)


# ---------------------------------------------------------------------------------------------- registrations


def _cifar_how_to_get(archive: str) -> str:
    return (f"Download {archive} from https://www.cs.toronto.edu/~kriz/cifar.html and extract it into the data dir "
            "(default ~/.cache/kdbench/data, or $KDBENCH_DATA_DIR, or --data-dir).")


register_dataset(DatasetInfo(
    name="cifar100", num_classes=100, in_channels=3,
    mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761),
    how_to_get=_cifar_how_to_get("cifar-100-python.tar.gz"),
    load=load_cifar100, train_size=50_000, test_size=10_000,
))
register_dataset(DatasetInfo(
    name="cifar10", num_classes=10, in_channels=3,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    how_to_get=_cifar_how_to_get("cifar-10-python.tar.gz"),
    load=load_cifar10, train_size=50_000, test_size=10_000,
))
register_dataset(DatasetInfo(
    name="fashion-mnist", num_classes=10, in_channels=1,
    # Computed once over the zero-padded (32x32) training set, pixels scaled to [0, 1].
    mean=(0.2190,), std=(0.3318,),
    how_to_get="Run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four idx .gz files from "
               "https://github.com/zalandoresearch/fashion-mnist in a folder and pass --data-dir.",
    load=load_fashion_mnist, train_size=60_000, test_size=10_000,
))
register_dataset(DatasetInfo(
    name="synthetic", num_classes=10, in_channels=3,
    # Computed once over the generated training set, pixels scaled to [0, 1].
    mean=(0.5063, 0.5138, 0.5024), std=(0.2018, 0.2037, 0.2039),
    how_to_get="Nothing to get: generated in memory, deterministic and offline.",
    load=load_synthetic, train_size=SYNTHETIC_TRAIN, test_size=SYNTHETIC_TEST,
))


# ---------------------------------------------------------------------------------------------- CINIC-10 (ImageFolder)

#: Official CINIC-10 archive (Darlow et al. 2018, arXiv 1810.03505); it holds train/, valid/ and test/ at its top level.
CINIC10_URL = "https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz"
CINIC10_ARCHIVE = "CINIC-10.tar.gz"
CINIC10_FOLDER = "cinic-10"  # where a download is extracted, under the data dir


def _cinic10_dir(root: Path) -> Path | None:
    """The first of ``root/cinic-10``, ``root/CINIC-10`` and ``root`` holding ``train/`` and ``test/``."""
    for d in (root / CINIC10_FOLDER, root / "CINIC-10", root):
        if (d / "train").is_dir() and (d / "test").is_dir():
            return d
    return None


def _read_png_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        if img.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise KdbenchError(f"{path} is {img.size[0]}x{img.size[1]}; CINIC-10 images are "
                               f"{IMAGE_SIZE}x{IMAGE_SIZE}")
        return np.asarray(img.convert("RGB"), dtype=np.uint8)  # grayscale images get three equal planes


def _read_image_folder(path: Path, name: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An ImageFolder tree (one folder per class, sorted names = labels) as uint8 N x 3 x 32 x 32 and int64 labels."""
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(path))
    except (FileNotFoundError, OSError) as e:
        raise KdbenchError(f"{name}: {path} is not an image folder with one subfolder per class "
                           f"({_reason(e)})") from None
    paths = [p for p, _ in folder.samples]
    try:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            images = list(pool.map(_read_png_rgb, paths, chunksize=256))
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise KdbenchError(f"{name}: cannot read an image under {path} ({_reason(e)})") from None
    x = np.stack(images).transpose(0, 3, 1, 2) if images else np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    y = np.asarray(folder.targets, dtype=np.int64)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), list(folder.classes)


def load_cinic10(data_dir: Path | None = None, download: bool = True) -> ArrayData:
    """CINIC-10: trains on ``train/`` (90,000 images), evaluates on ``test/`` (90,000); ``valid/`` is not used.

    Read from ``data_dir`` (or the default data dir): its ``cinic-10/`` folder, or the folder itself, holding the
    ImageFolder layout ``train/``, ``valid/``, ``test/`` with 10 class folders of 32x32 PNGs; labels are the class
    folders in sorted order (airplane = 0 .. truck = 9, as in CIFAR-10). Otherwise downloaded (about 0.7 GB) and
    extracted into ``cinic-10/`` when ``download`` is set.
    """
    root = data_dir if data_dir is not None else default_data_dir()
    found = _cinic10_dir(root)
    if found is None:
        how = (f"download {CINIC10_URL} and extract it into {root / CINIC10_FOLDER} (train/, valid/, test/), "
               "or pass --data-dir")
        if not download:
            raise KdbenchError(f"cinic10 not found in {root} and downloading is disabled; {how}")
        try:
            from torchvision.datasets import utils as tv_utils

            with _downloading_into(root):
                tv_utils.download_and_extract_archive(CINIC10_URL, str(root),
                                                      extract_root=str(root / CINIC10_FOLDER), filename=CINIC10_ARCHIVE)
        except _DOWNLOAD_ERRORS as e:
            raise KdbenchError(f"cinic10 not found in {root} and could not be downloaded ({_reason(e)}); "
                               f"{how}") from None
        found = _cinic10_dir(root)
        if found is None:
            raise KdbenchError(f"cinic10 download into {root} left no train/ and test/ folders; {how}")
    train_x, train_y, train_classes = _read_image_folder(found / "train", "cinic10")
    test_x, test_y, test_classes = _read_image_folder(found / "test", "cinic10")
    if len(train_classes) != 10 or train_classes != test_classes:
        raise KdbenchError(f"cinic10 in {found} must have the same 10 class folders in train/ and test/; found "
                           f"{len(train_classes)} in train/ and {len(test_classes)} in test/")
    return ArrayData(dataset_info("cinic10"), train_x, train_y, test_x, test_y)


register_dataset(DatasetInfo(
    name="cinic10", num_classes=10, in_channels=3,
    # The CINIC-10 authors' per-channel statistics (BayesWatch/cinic-10 README), pixels scaled to [0, 1].
    mean=(0.47889522, 0.47227842, 0.43047404), std=(0.24205776, 0.23828046, 0.25874835),
    how_to_get=f"Download {CINIC10_ARCHIVE} from {CINIC10_URL} and extract it into <data dir>/{CINIC10_FOLDER} "
               "(default ~/.cache/kdbench/data, or $KDBENCH_DATA_DIR, or --data-dir); kdbench trains on train/ and "
               "tests on test/.",
    load=load_cinic10, train_size=90_000, test_size=90_000,
))


# Datasets read from folders of JPEGs (ImageNet, Tiny-ImageNet) register on import; keep this import at the bottom.
from kdbench import folder_data  # noqa: E402,F401
