"""Decoded and augmented images per second of the ImageNet input path, per decoding core: kdbench's CPU loader
(``kdbench.folder_loader``) beside torchvision's reference pipeline (``references/classification``'s training
preset, RandomResizedCrop(224) + flip + PILToTensor + ConvertImageDtype + Normalize, in a plain DataLoader) on the
same JPEG files, the same worker count and batch. Issue 26's target: kdbench at least 1.0x the reference per core.
A last row times the device backend (``--data-backend device``: workers read the files, TorchCodec decodes each batch
on ``--device``, nvjpeg on CUDA), whose decoding runs on the device, so its rate is not per core.

    python benchmarks/input_path.py --data-dir /data --workers 4 --batches 50   # an ImageNet tree (train/<wnid>/)
    python benchmarks/input_path.py --generate 2000 --workers 1                  # JPEGs like ImageNet's, made here
    python benchmarks/input_path.py --generate 2000 --workers 4 --device cuda    # the device backend on a GPU

Quiet machine only: it measures speed. Prints one table row per pipeline, and writes them as CSV with ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from kdbench.folder_data import IMAGENET_MEAN, IMAGENET_STD, load_imagenet
from kdbench.folder_loader import FolderLoader


def generate(root: Path, images: int, classes: int = 10) -> Path:
    """``images`` JPEGs of ImageNet's typical size (500x375, quality 90) in train/ and a few in val/."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for k in range(images):
        for split in ("train",) + (("val",) if k < classes else ()):
            path = root / "imagenet" / split / f"n{k % classes:08d}" / f"{k}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            noise = torch.rand(375 // 8, 500 // 8, 3, generator=g)
            pixels = torch.nn.functional.interpolate(noise.permute(2, 0, 1)[None], size=(375, 500), mode="bilinear")
            Image.fromarray((255 * pixels[0].permute(1, 2, 0)).to(torch.uint8).numpy()).save(path, quality=90)
    return root


def _rate(batches, limit: int, device: str = "cpu") -> tuple[float, int]:
    """Images per second over ``limit`` batches after the first (worker start-up excluded)."""
    iterator = iter(batches)
    next(iterator)
    started, images = time.perf_counter(), 0
    for _, batch in zip(range(limit), iterator):
        images += len(batch[0])
    if device == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - started), images


def kdbench_rate(data_dir: Path, workers: int, batch: int, limit: int, device: str = "cpu",
                 backend: str = "cpu") -> tuple[float, int]:
    loader = FolderLoader(load_imagenet(data_dir), device, batch_size=batch, workers=workers, backend=backend)
    return _rate(loader.train_epoch(seed=0, epoch=0), limit, device)


def device_rate(data_dir: Path, workers: int, batch: int, limit: int, device: str) -> tuple[float, int]:
    return kdbench_rate(data_dir, workers, batch, limit, device, backend="device")


def reference_rate(data_dir: Path, workers: int, batch: int, limit: int) -> tuple[float, int]:
    preset = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.PILToTensor(),
                        T.ConvertImageDtype(torch.float), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    train = Path(load_imagenet(data_dir).train_paths[0]).parents[1]  # <root>/train
    folder = datasets.ImageFolder(str(train), preset)
    return _rate(DataLoader(folder, batch_size=batch, shuffle=True, num_workers=workers), limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="a folder holding an ImageNet tree (train/<wnid>/*.JPEG)")
    parser.add_argument("--generate", type=int, metavar="N", help="make N JPEGs like ImageNet's in a temp folder")
    parser.add_argument("--workers", type=int, default=1, help="decoding processes (0: in the main process)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="batches timed per pipeline, after the first")
    parser.add_argument("--device", default="cpu",
                        help="where the device backend decodes (cuda: nvjpeg); the other pipelines decode in workers")
    parser.add_argument("--out", type=Path, help="also write the rows as CSV here")
    args = parser.parse_args()
    if (args.data_dir is None) == (args.generate is None):
        parser.error("give one of --data-dir and --generate")
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir or generate(Path(scratch), args.generate)
        cores = max(args.workers, 1)
        rows = []
        for name, measure in (("torchvision reference", reference_rate), ("kdbench cpu loader", kdbench_rate)):
            rate, images = measure(data_dir, args.workers, args.batch_size, args.batches)
            rows.append({"pipeline": name, "workers": args.workers, "images": images, "img_per_s": round(rate, 1),
                         "img_per_s_per_core": round(rate / cores, 1)})
        rate, images = device_rate(data_dir, args.workers, args.batch_size, args.batches, args.device)
        device_row = {"pipeline": f"kdbench device backend ({args.device})", "workers": args.workers,
                      "images": images, "img_per_s": round(rate, 1), "img_per_s_per_core": ""}
    rows += [{"pipeline": "kdbench / reference", "workers": args.workers, "images": "",
              "img_per_s": round(rows[1]["img_per_s"] / rows[0]["img_per_s"], 3), "img_per_s_per_core": ""},
             device_row]
    for row in rows:
        print("  ".join(f"{key} {value}" for key, value in row.items()))
    if args.out:
        with open(args.out, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
