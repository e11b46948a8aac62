"""Folder datasets (kdbench/folder_data.py) and their loader (kdbench/folder_loader.py), on generated trees of real
JPEG files in the official layouts: class order, labels, clear errors, the anchors' transforms, replayable
augmentation, and runs through the harness."""

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_sweep
from PIL import Image
from torchvision import transforms as T

from kdbench.data import load_dataset, load_synthetic
from kdbench.errors import KdbenchError
from kdbench.folder_data import IMAGENET_MEAN, IMAGENET_STD, load_imagenet, load_tiny_imagenet
from kdbench.folder_loader import FolderLoader
from kdbench.harness import RunEnv, run_sweep
from kdbench.loader import make_loader, stream_seed
from kdbench.spec import DATA_BACKENDS, Recipe

WNIDS = ("n03000000", "n01000000", "n02000000")  # created out of order: labels must follow the sorted names


def _jpeg(path: Path, size: tuple[int, int], shade: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pixels = (shade + 40 * torch.rand(size[1], size[0], 3, generator=g)).clamp(0, 255).to(torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path, quality=90)


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory) -> Path:
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, images of different sizes and a colour per class."""
    root = tmp_path_factory.mktemp("data") / "imagenet"
    for c, wnid in enumerate(WNIDS):
        shade = 60 * int(wnid[1:3])
        for k in range(6):
            _jpeg(root / "train" / wnid / f"{wnid}_{k}.JPEG", (40 + 7 * k, 36 + 5 * c), shade, 10 * c + k)
        for k in range(2):
            _jpeg(root / "val" / wnid / f"ILSVRC2012_val_{c}{k}.JPEG", (50, 44), shade, 100 + 10 * c + k)
    return root.parent


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    """tiny-imagenet-200: train/<wnid>/images/*.JPEG, val/images/*.JPEG with val_annotations.txt."""
    root = tmp_path_factory.mktemp("data") / "tiny-imagenet-200"
    lines = []
    for c, wnid in enumerate(WNIDS):
        for k in range(4):
            _jpeg(root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", (64, 64), 60 * int(wnid[1:3]), c + k)
        lines.append(f"val_{c}.JPEG\t{wnid}\t0\t0\t63\t63")
        _jpeg(root / "val" / "images" / f"val_{c}.JPEG", (64, 64), 60 * int(wnid[1:3]), 50 + c)
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    return root.parent


def test_imagenet_reads_the_imagefolder_layout_with_classes_in_sorted_order(imagenet_tree):
    data = load_imagenet(imagenet_tree)
    assert data.classes == tuple(sorted(WNIDS))
    assert len(data.train_paths) == 18 and len(data.test_paths) == 6
    for paths, labels in ((data.train_paths, data.train_y), (data.test_paths, data.test_y)):
        assert [data.classes[y] for y in labels.tolist()] == [Path(p).parent.name for p in paths]
    assert load_dataset("imagenet", imagenet_tree / "imagenet").classes == data.classes  # the folder itself too


def test_tiny_imagenet_labels_its_validation_images_from_the_annotations(tiny_tree):
    data = load_tiny_imagenet(tiny_tree)
    assert data.classes == tuple(sorted(WNIDS)) and len(data.train_paths) == 12
    assert [(Path(p).name, data.classes[y]) for p, y in zip(data.test_paths, data.test_y.tolist())] == [
        (f"val_{c}.JPEG", wnid) for c, wnid in enumerate(WNIDS)]


def test_a_missing_or_malformed_tree_is_one_line_naming_the_layout_and_the_path(tmp_path, imagenet_tree, tiny_tree):
    for load, expected in ((load_imagenet, "train/<wnid>/*.JPEG"), (load_tiny_imagenet, "val_annotations.txt")):
        with pytest.raises(KdbenchError, match="not found") as error:
            load(tmp_path)
        assert expected in str(error.value) and str(tmp_path) in str(error.value) and "\n" not in str(error.value)
    broken = tmp_path / "imagenet"
    for split, wnid in (("train", "n01"), ("val", "n02")):
        _jpeg(broken / split / wnid / "a.JPEG", (8, 8), 0, 0)
    with pytest.raises(KdbenchError, match="not the same wnids"):
        load_imagenet(tmp_path)
    annotations = tiny_tree / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    text = annotations.read_text()
    try:
        annotations.write_text(text + "val_9.JPEG\tn09999999\t0\t0\t1\t1\n")
        with pytest.raises(KdbenchError, match="line 4 .* an unknown wnid"):
            load_tiny_imagenet(tiny_tree)
    finally:
        annotations.write_text(text)


def _loader(data, device="cpu", **options):
    return FolderLoader(data, device, **{"batch_size": 4, "eval_batch_size": 4, "workers": 0, **options})


def test_evaluation_is_torchvisions_resize_centre_crop_to_tensor_normalize(imagenet_tree):
    data = load_imagenet(imagenet_tree)
    reference = T.Compose([T.Resize(round(48 * 256 / 224)), T.CenterCrop(48), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = torch.stack([reference(Image.open(p).convert("RGB")) for p in data.test_paths])
    got, labels = map(torch.cat, zip(*_loader(data, image_size=48).test_batches()))
    assert torch.equal(got, expected) and torch.equal(labels, data.test_y)


def test_each_training_image_is_augmented_by_torchvision_from_its_own_stream(imagenet_tree):
    """Which RNG decides the crops: torch's global generator, seeded per image by (seed, epoch, dataset index)."""
    data = load_imagenet(imagenet_tree)
    loader = _loader(data, image_size=32)
    (x, y, positions), *_ = loader.train_epoch(seed=3, epoch=1, positions=True)
    index = int(loader.subset[positions[0]])
    torch.manual_seed(stream_seed(3, 1, f"aug:{index}"))
    image = Image.open(data.train_paths[index]).convert("RGB")
    pil = T.Compose([T.RandomResizedCrop(32), T.RandomHorizontalFlip()])(image)
    assert torch.equal(x[0], T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(pil)))
    assert int(y[0]) == int(data.train_y[index])


def _epoch(loader, seed=0, epoch=0):
    images, labels, positions = map(torch.cat, zip(*loader.train_epoch(seed, epoch, positions=True)))
    return images, labels, positions


def test_an_epoch_is_the_same_whatever_the_batch_size_or_workers_and_differs_between_epochs(imagenet_tree):
    data = load_imagenet(imagenet_tree)
    first = _epoch(_loader(data, image_size=32))
    for other in (_loader(data, image_size=32, batch_size=5), _loader(data, image_size=32, workers=2)):
        assert all(torch.equal(a, b) for a, b in zip(first, _epoch(other)))
    assert not torch.equal(_epoch(_loader(data, image_size=32), epoch=1)[0], first[0])
    state = torch.get_rng_state()
    _epoch(_loader(data, image_size=32))
    assert torch.equal(torch.get_rng_state(), state)  # the trainer's random state is left alone


def test_tiny_imagenet_trains_on_rotated_flipped_64_pixel_images_and_evaluates_them_as_they_are(tiny_tree):
    data = load_tiny_imagenet(tiny_tree)
    loader = _loader(data)
    x, _ = next(iter(loader.train_epoch(0, 0)))
    assert x.shape == (4, 3, 64, 64)
    expected = T.Compose([T.ToTensor(), T.Normalize((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))])
    got = next(iter(loader.test_batches()))[0]
    assert torch.equal(got[0], expected(Image.open(data.test_paths[0]).convert("RGB")))


def _grey_levels(normalised: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised images back to 0..255 grey levels (floats), so backends compare in the unit their pixels have."""
    return 255 * (normalised * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None])


def _both_backends(data, device="cpu", **options):
    """The same batches of the cpu and device backends, in grey levels: a training epoch, the test set."""
    def batches(backend):
        loader = _loader(data, backend=backend, **options)
        train = torch.cat([x for x, _ in loader.train_epoch(seed=5, epoch=2)]).cpu()
        test = torch.cat([x for x, _ in loader.test_batches()]).cpu()
        return [_grey_levels(x, data.info.mean, data.info.std) for x in (train, test)]
    return batches("cpu"), batches("device")


def test_the_device_backend_crops_and_flips_as_the_cpu_one_within_a_grey_level(imagenet_tree):
    """Same draws, same decoder on a CPU (libjpeg-turbo): they differ only where torchvision's tensor resize rounds
    unlike Pillow's, by at most one grey level (antialiased bilinear both)."""
    (train, test), (train_device, test_device) = _both_backends(load_imagenet(imagenet_tree), image_size=32)
    for cpu, device in ((train, train_device), (test, test_device)):
        difference = (cpu - device).abs()
        assert difference.max() <= 1 + 1e-3 and difference.mean() < 0.5
    assert not torch.equal(train[:, :, :, :16], train[:, :, :, :16].flip(0))  # the draws are not all alike


def test_the_device_backend_rotates_tiny_imagenet_as_the_cpu_one_but_for_a_few_edge_pixels(tiny_tree):
    """Nearest-neighbour rotation: torchvision's tensor rotation picks another neighbour than Pillow's at a few
    pixels (under 1 % of them); the test images are 64x64, taken as they are."""
    (train, test), (train_device, test_device) = _both_backends(load_tiny_imagenet(tiny_tree))
    assert (test - test_device).abs().max() < 1e-3
    assert ((train - train_device).abs() > 1e-3).float().mean() < 0.01


def test_imagenets_odd_files_decode_alike_in_both_backends_and_an_unreadable_one_is_named(tmp_path):
    """ImageNet's training set holds greyscale and CMYK JPEGs and one PNG named .JPEG."""
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        _jpeg(root / split / "n01" / "rgb.JPEG", (40, 36), 100, 1)
        colour = Image.open(root / split / "n01" / "rgb.JPEG")
        colour.convert("L").save(root / split / "n01" / "grey.JPEG")
        colour.convert("CMYK").save(root / split / "n01" / "cmyk.JPEG")
        colour.save(root / split / "n01" / "png.JPEG", format="PNG")
    data = load_imagenet(tmp_path)
    (train, test), (train_device, test_device) = _both_backends(data, image_size=32)
    assert train.shape == (4, 3, 32, 32) and (test - test_device).abs().max() <= 1 + 1e-3
    (root / "val" / "n01" / "png.JPEG").write_bytes(b"not an image")
    for backend in DATA_BACKENDS:
        with pytest.raises(KdbenchError, match="cannot read image .*png.JPEG"):
            list(_loader(load_imagenet(tmp_path), backend=backend, image_size=32).test_batches())


@pytest.mark.gpu
def test_nvjpeg_on_the_gpu_agrees_with_the_cpu_backend_up_to_its_decoder(imagenet_tree):
    """nvjpeg's IDCT and chroma upsampling are not libjpeg-turbo's: a mean difference under 2 grey levels, and under
    16 at all but 0.1 % of pixels (the noisy test images are a hard case for a decoder)."""
    (train, test), (train_gpu, test_gpu) = _both_backends(load_imagenet(imagenet_tree), device="cuda", image_size=32)
    for cpu, gpu in ((train, train_gpu), (test, test_gpu)):
        difference = (cpu - gpu).abs()
        assert difference.mean() < 2 and torch.quantile(difference.flatten(), 0.999) < 16


def test_a_data_backend_is_refused_in_one_line_for_datasets_held_on_the_device(imagenet_tree, tmp_path):
    with pytest.raises(KdbenchError, match="synthetic is held whole on the run's device"):
        tiny_sweep(data_backend="device").plan()
    with pytest.raises(KdbenchError, match="--data-backend is for imagenet"):
        make_loader(load_synthetic(), "cpu", batch_size=4, backend="device")
    with pytest.raises(KdbenchError, match="give one of cpu, device"):
        _loader(load_imagenet(imagenet_tree), backend="dali")


def test_the_device_backend_is_part_of_the_run_spec_and_the_default_named_is_no_setting(imagenet_tree, tmp_path):
    from kdbench.results import ResultsStore

    recipe = Recipe("folder-check", epochs=1, batch_size=4, warmup_steps=0, lr=0.01, image_size=32)
    plans = {backend: tiny_sweep(methods=("kd",), pair=("tv_resnet18", "mobilenet_v1"), recipe=recipe,
                                 dataset="imagenet", teacher_recipe=recipe, data_backend=backend).plan()
             for backend in (None, "cpu", "device")}
    assert [r.run_id for r in plans[None]] == [r.run_id for r in plans["cpu"]]
    assert all(r.data_backend == "device" for r in plans["device"])
    assert not {r.run_id for r in plans["device"]} & {r.run_id for r in plans[None]}
    env = RunEnv(ResultsStore(tmp_path / "results"), data_dir=imagenet_tree, download=False, progress=False)
    records = run_sweep(plans["device"], env)
    assert [r.status for r in records] == ["finished"] * 2, [r.error for r in records]
    assert math.isfinite(records[-1].epochs[0]["loss"])


def test_a_validation_split_and_subsets_come_from_the_training_folder(imagenet_tree):
    data = load_imagenet(imagenet_tree)
    loader = _loader(data, image_size=32, val_split=4, train_subset=10, test_subset=3)
    assert loader.has_validation and loader.num_train == 10 and loader.test_y.shape == (3,)
    val = list(loader.test_batches("val"))
    assert sum(len(y) for _, y in val) == 4
    plain = list(loader.train_plain())
    assert sum(len(y) for _, y in plain) == 10
    with pytest.raises(KdbenchError, match="32x32 datasets only"):
        next(iter(loader.train_epoch(0, 0, views=("strong",))))


def test_image_size_is_for_folder_datasets_only():
    with pytest.raises(KdbenchError, match="--image-size is for imagenet"):
        make_loader(load_synthetic(), "cpu", batch_size=4, image_size=64)


def test_resnet34_teaches_resnet18_on_imagenet_files_at_a_reduced_size(imagenet_tree, tmp_path):
    from kdbench.results import ResultsStore

    recipe = Recipe("folder-check", epochs=1, batch_size=4, warmup_steps=0, lr=0.01, image_size=32)
    sweep = tiny_sweep(methods=("student", "kd", "fitnet"), pair=("tv_resnet34", "tv_resnet18"), recipe=recipe,
                       dataset="imagenet", teacher_recipe=recipe)
    env = RunEnv(ResultsStore(tmp_path / "results"), data_dir=imagenet_tree, download=False, progress=False)
    records = run_sweep(sweep.plan(), env)
    assert [r.status for r in records] == ["finished"] * 4, [r.error for r in records]
    for record in records:
        assert record.spec.recipe.image_size == 32 and math.isfinite(record.epochs[0]["loss"])
        assert record.metrics["train_images"] == 18.0 and record.metrics["test_images"] == 6.0
    assert records[-1].metrics["student_macs"] == records[1].metrics["student_macs"] < 40e6  # 32x32 inputs


def test_the_imagenet_recipes_scale_lr_with_the_global_batch_unless_lr_is_given():
    from kdbench.spec import RECIPES

    imagenet = RECIPES.get("imagenet")
    assert (imagenet.epochs, imagenet.lr, imagenet.weight_decay, imagenet.milestone_epochs()) == (100, 0.1, 1e-4,
                                                                                                   (30, 60, 90))
    mdistillers = imagenet.overridden(batch_size=512)
    assert (mdistillers.lr, mdistillers.lr_batch) == (0.2, 512)
    assert imagenet.overridden(batch_size=512, lr=0.1).lr == 0.1
    assert imagenet.overridden(epochs=10).lr == 0.1
    assert RECIPES.get("tiny-imagenet").milestone_epochs() == (60, 120, 160)
    assert RECIPES.get("paper").overridden(batch_size=128).lr is None  # CIFAR recipes keep the model's lr


def test_published_imagenet_numbers_sit_beside_runs_of_the_same_dataset_and_recipe():
    import pandas as pd

    from kdbench.report.published import load_published, mismatch, published_cells

    results = Path(__file__).resolve().parents[1] / "results"
    published = load_published([results / "published_cifar100.csv", results / "published_imagenet.csv"])
    assert {"cifar100", "imagenet", "tiny-imagenet"} <= set(published["dataset"])
    run = pd.Series({"dataset": "imagenet", "recipe": "imagenet-mdistiller", "method": "kd", "epochs": 100,
                     "batch_size": 512, "lr": 0.2, "train_subset": None, "test_subset": None})
    assert mismatch(run, published) == ""
    cells = published_cells(published, "tv_resnet34->tv_resnet18", "method", "tv_resnet18", run, "official",
                            "top1_best", "")
    assert cells["published"].startswith("71.03") and "mdistiller" in cells["published_source"]
    on_cifar = run.copy()
    on_cifar["dataset"] = "cinic10"
    assert "CIFAR-100, ImageNet, Tiny-ImageNet results" in mismatch(on_cifar, published)


def test_a_method_whose_view_the_folder_loader_does_not_make_is_refused_when_planned():
    sweep = tiny_sweep(methods=("kd", "mlkd"), pair=("tv_resnet34", "tv_resnet18"), dataset="imagenet")
    with pytest.raises(KdbenchError, match="mlkd trains on the augmented view.s. strong, which the imagenet loader"):
        sweep.plan()
    assert [r.method for r in tiny_sweep(methods=("kd",), pair=("tv_resnet34", "tv_resnet18"),
                                         dataset="imagenet").plan()] == ["student", "kd"]


@pytest.mark.parametrize("method, pair, expected", [
    ("kd", ("tv_resnet34", "tv_resnet18"), {"ce_weight": 0.5, "kd_weight": 0.5, "temperature": 1.0}),
    ("kd", ("tv_resnet50", "mobilenet_v1"), {"ce_weight": 0.5, "kd_weight": 0.5, "temperature": 1.0}),
    ("kd_dot", ("tv_resnet34", "tv_resnet18"), {"ce_weight": 0.5, "kd_weight": 0.5, "temperature": 1.0, "delta": 0.09}),
    ("dkd", ("tv_resnet34", "tv_resnet18"), {"ce_weight": 1.0, "alpha": 1.0, "beta": 0.5, "temperature": 1.0,
                                             "warmup_epochs": 1}),
    ("dkd", ("tv_resnet50", "mobilenet_v1"), {"beta": 2.0, "temperature": 1.0, "warmup_epochs": 1}),
    ("takd", ("tv_resnet34", "tv_resnet18"), {"ce_weight": 0.0, "temperature": 5.0}),  # no ImageNet settings
    ("ofd", ("tv_resnet50", "mobilenet_v1"), {"beta": 1e-4}),
    ("reviewkd", ("tv_resnet34", "tv_resnet18"), {"beta": 1.0}),
    ("reviewkd", ("tv_resnet50", "mobilenet_v1"), {"beta": 8.0}),
])
def test_mdistillers_imagenet_configs_are_the_official_values_on_the_imagenet_pairs(method, pair, expected):
    from kdbench.methods import method_class

    options = dict(method_class(method).resolve_options({}, "official", *pair))
    assert expected.items() <= options.items()


def test_the_input_path_benchmark_runs_both_pipelines_on_generated_jpegs(tmp_path):
    """Speed is measured on a quiet machine (benchmarks/input_path.py); here only that it runs and what it prints."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "input_path.py"
    out = subprocess.run([sys.executable, str(script), "--generate", "24", "--workers", "0", "--batch-size", "4",
                          "--batches", "2", "--out", str(tmp_path / "rows.csv")], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert [line.split("  ")[0] for line in out] == ["pipeline torchvision reference", "pipeline kdbench cpu loader",
                                                    "pipeline kdbench / reference",
                                                    "pipeline kdbench device backend (cpu)"]
    assert "images 8" in out[0] and "images 8" in out[1] and "images 8" in out[3]
    assert (tmp_path / "rows.csv").read_text().startswith("pipeline,workers,images,img_per_s")


def test_reviewkd_reads_the_students_preactivations_on_the_imagenet_pairs():
    from conftest import method_context

    from kdbench.methods import method_class
    from kdbench.models import create_model
    from kdbench.models.taps import feature_shapes

    def built(pair, size):
        options = dict(method_class("reviewkd").resolve_options({}, "official", *pair))
        shapes = [feature_shapes(create_model(arch, 1000), (3, size, size)) for arch in pair]
        return method_class("reviewkd")(method_context("reviewkd", shapes[1], shapes[0], "official", options,
                                                       student=pair[1]))

    assert built(("tv_resnet34", "tv_resnet18"), 64).student_taps == (
        "stage1_preact", "stage2_preact", "stage3_preact", "stage4_preact", "pooled")
    assert built(("resnet56", "resnet20"), 32).student_taps == ("stage1", "stage2", "stage3", "pooled")


def test_epoch_counts_scale_from_the_benchmarks_own_official_schedule():
    """DKD's ImageNet warm-up (1 epoch of mdistiller's 100) and ReviewKD's (20 of 100) keep their share of a recipe;
    CIFAR pairs scale from 240."""
    from kdbench.methods import method_class

    def warmup(method, pair, epochs):
        return dict(method_class(method).resolve_options({}, "official", *pair, epochs))["warmup_epochs"]

    assert warmup("reviewkd", ("tv_resnet34", "tv_resnet18"), 100) == 20
    assert warmup("reviewkd", ("tv_resnet34", "tv_resnet18"), 10) == 2
    assert warmup("reviewkd", ("resnet56", "resnet20"), 240) == 20 and warmup("reviewkd", ("resnet56", "resnet20"),
                                                                               24) == 2
    assert warmup("dkd", ("tv_resnet50", "mobilenet_v1"), 100) == 1
