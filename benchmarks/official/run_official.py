"""Runs an official train_student.py (RepDistiller's or SemCKD's) unmodified, with shims only for what changed around
it since it was written: torchvision's CIFAR ``train_data``/``train_labels`` (removed in 0.2.2), the
``tensorboard_logger`` package (gone), SemCKD's ImageNet/DALI modules (imported at top level, unused on CIFAR), the md5
check (the fake CIFAR-100 of fake_cifar100.py), and ``helper.util.accuracy``'s ``.view`` of a non-contiguous slice
(an error on current torch; replaced by the same top-k count).

Usage: run_official.py REPO DATA_DIR SCRIPT ARGS...  It works in a fresh temporary folder whose ``data`` is DATA_DIR
(both codes read ./data/cifar-100-python and write ./save/), so the repository stays as cloned."""
import os
import runpy
import sys
import tempfile
import types

import torch
import torchvision.datasets as tvd
import torchvision.datasets.cifar

repo, data_dir, script, args = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2]), sys.argv[3], sys.argv[4:]
os.chdir(tempfile.mkdtemp(prefix="official-"))
os.symlink(data_dir, "data")
sys.path.insert(0, repo)
torchvision.datasets.cifar.check_integrity = lambda *args, **kwargs: True
for old, new in (("train_data", "data"), ("train_labels", "targets"), ("test_data", "data"),
                 ("test_labels", "targets")):
    if not hasattr(tvd.CIFAR10, old):
        setattr(tvd.CIFAR10, old, property(lambda self, new=new: getattr(self, new)))


class _Logger:
    def __init__(self, *args, **kwargs):
        pass

    def log_value(self, *args, **kwargs):
        pass


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def _accuracy(output, target, topk=(1,)):
    with torch.no_grad():
        hits = output.topk(max(topk), 1).indices.eq(target[:, None])
        return [hits[:, :k].any(1).float().mean().mul(100).reshape(1) for k in topk]


_module("tensorboard_logger", Logger=_Logger, configure=lambda *a, **k: None, log_value=lambda *a, **k: None)
_module("dataset.imagenet", get_imagenet_dataloader=None, imagenet_list=["imagenet", "imagenette"])
_module("dataset.imagenet_dali", get_dali_data_loader=None)
import helper.util  # noqa: E402  (the repository's own)

helper.util.accuracy = _accuracy
sys.argv = [script, *args]
runpy.run_path(os.path.join(repo, script), run_name="__main__")
