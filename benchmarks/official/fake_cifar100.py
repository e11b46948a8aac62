"""Fake CIFAR-100 in the on-disk python format and random teachers, for speed comparisons (nothing learns here).

Usage: fake_cifar100.py ROOT N_TRAIN N_TEST. Writes the same random pixels and labels twice: ROOT/kdbench with bytes
keys (as the original files load under kdbench's reader) and ROOT/torchvision with str keys (as torchvision's reader
wants); and random-initialised vgg13, resnet32x4 and resnet56 teachers in RepDistiller's checkpoint format under
ROOT/teachers, at the paths its train_student.py parses."""
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from kdbench.models import create_model

root, n_train, n_test = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
splits = {s: (rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 100, n).tolist())
          for s, n in (("train", n_train), ("test", n_test))}
for folder, key in (("kdbench", lambda k: k.encode()), ("torchvision", lambda k: k)):
    base = root / folder / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    for split, (rows, fine) in splits.items():
        with open(base / split, "wb") as f:
            pickle.dump({key("filenames"): [b"x.png"] * len(fine), key("batch_label"): split.encode(),
                         key("fine_labels"): fine, key("coarse_labels"): [c // 5 for c in fine], key("data"): rows}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({key("fine_label_names"): [f"c{k}" for k in range(100)],
                     key("coarse_label_names"): [f"s{k}" for k in range(20)]}, f)
torch.manual_seed(0)
for arch in ("vgg13", "resnet32x4", "resnet56"):
    folder = root / "teachers" / f"{arch}_cifar100_lr_0.05_decay_0.0005_trial_0"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": create_model(arch, 100, 3).state_dict(), "epoch": 240}, folder / f"{arch}_best.pth")
print("prepared", root)
