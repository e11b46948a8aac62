"""One run across several processes (kdbench/distributed.py), on this CPU under gloo: two processes at a global batch
B take the step one process takes at B; BatchNorm is per process unless --sync-bn; what cannot run so is refused
when planned."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import method_context, tiny_sweep
from test_zoo_relations import build, rkd_by_hand, step

from kdbench.data import load_synthetic
from kdbench.distributed import World, average_, sync_batch_norm
from kdbench.errors import KdbenchError
from kdbench.loader import DeviceLoader
from kdbench.methods.base import StepOutputs
from kdbench.models import create_model

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _kdbench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "kdbench", "run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_two_gloo_processes_with_sync_bn_train_kd_fitnet_crd_and_sakd_as_one_process_does(tmp_path):
    """The same teacher (a checkpoint), two epochs of one step at a global batch of 64. Tolerance: losses within
    1e-4 relative and parameters (BatchNorm statistics included) within 1e-3 relative, the rounding of a sum over
    two processes' shards against one over the batch, grown through two SGD steps (FitNet's hint loss, about 150 on
    random data, amplifies it most); test accuracy identical. SAKD fits its head on the teacher before training
    (rank 0 alone, over whole batches): the other process trains with that head, so the runs agree."""
    torch.manual_seed(0)
    torch.save(create_model("resnet14", 10, 3).state_dict(), tmp_path / "teacher.pt")
    common = ["--methods", "kd,fitnet,crd,sakd", "--pairs", "resnet14:resnet8", "--dataset", "synthetic", "--recipe",
              "short", "--epochs", "2", "--train-subset", "64", "--batch-size", "64", "--device", "cpu",
              "--teacher-ckpt", "teacher.pt"]
    one = _kdbench(*common, "--results-dir", "one", cwd=tmp_path)
    two = _kdbench(*common, "--gpus-per-run", "2", "--sync-bn", "--results-dir", "two", cwd=tmp_path)
    assert (one.returncode, two.returncode) == (0, 0), one.stderr[-3000:] + two.stderr[-3000:]
    from kdbench.results import ResultsStore

    for method in ("kd", "fitnet", "crd", "sakd"):
        a, b = (next(ResultsStore(tmp_path / d).root.glob(f"student-{method}-*")) for d in ("one", "two"))
        records = [ResultsStore(tmp_path / d).load_record(r.name) for d, r in (("one", a), ("two", b))]
        assert records[1].spec.world_size == 2 and records[1].spec.sync_bn is True
        assert records[1].provenance["process_group_backend"] == "gloo"
        # memory: rank 0's, as one process records it, and both processes' together
        assert records[1].metrics["peak_bytes_all_processes"] > records[1].metrics["cpu_peak_rss_bytes"]
        for epoch_one, epoch_two in zip(records[0].epochs, records[1].epochs):
            assert epoch_one["top1"] == epoch_two["top1"]
            for name in (k for k in epoch_one if k.startswith("loss")):
                assert epoch_two[name] == pytest.approx(epoch_one[name], rel=1e-4), (method, name)
        weights = [torch.load(r / "model.pt") for r in (a, b)]
        for key, value in weights[0].items():
            torch.testing.assert_close(weights[1][key].float(), value.float(), rtol=1e-3, atol=1e-3, msg=key)


def _per_process_batch_norm(rank: int, size: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.set_num_threads(1)
    loader = DeviceLoader(load_synthetic(), "cpu", batch_size=8)
    loader.rank, loader.ranks = rank, size
    x, _, positions = next(iter(loader.train_epoch(seed=0, epoch=0, positions=True)))
    torch.manual_seed(0)
    model = create_model("resnet8", 10, 3).train()
    with torch.no_grad():
        stem = model.conv1(x)  # what the first BatchNorm normalises: this process's shard only
        model(x)
    torch.save({"positions": positions, "running_mean": model.bn1.running_mean.clone(),
                "shard_mean": stem.mean(dim=(0, 2, 3))}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_by_default_each_process_normalises_with_its_own_shards_statistics(tmp_path):
    """Rank r takes positions r, r + N, ... of each global batch (DistributedSampler's deal), and its BatchNorm's
    running mean moves by momentum x its own shard's mean: nothing is synchronised without --sync-bn."""
    mp.spawn(_per_process_batch_norm, args=(2, _free_port(), tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = DeviceLoader(load_synthetic(), "cpu", batch_size=8)
    _, _, positions = next(iter(whole.train_epoch(seed=0, epoch=0, positions=True)))
    assert torch.equal(ranks[0]["positions"], positions[0::2]) and torch.equal(ranks[1]["positions"], positions[1::2])
    for rank in ranks:
        torch.testing.assert_close(rank["running_mean"], 0.1 * rank["shard_mean"])
    assert not torch.allclose(ranks[0]["running_mean"], ranks[1]["running_mean"])


def _synced_gradients(rank: int, size: int, port: int, out: Path) -> None:
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("resnet8", 10, 3).train()
    if size > 1:
        sync_batch_norm(model, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    torch.nn.functional.cross_entropy(model(x[rank::size]), y[rank::size]).backward()
    gradients = [p.grad for p in model.parameters()]
    average_(gradients, World(rank, size))
    if rank == 0:
        torch.save({"gradients": gradients, "running_var": model.bn1.running_var}, out / f"world{size}.pt")
    if size > 1:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_batch_norm_on_cpus_gives_the_gradients_of_the_whole_batch(tmp_path):
    """SyncBatchNormCPU and the gradient average: one step's gradients within 1e-6 of one process's on the whole
    batch (float rounding of the sums over two shards)."""
    _synced_gradients(0, 1, 0, tmp_path)
    mp.spawn(_synced_gradients, args=(2, _free_port(), tmp_path), nprocs=2)
    one, two = (torch.load(tmp_path / f"world{n}.pt") for n in (1, 2))
    for a, b in zip(one["gradients"], two["gradients"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two["running_var"], one["running_var"])


POOLED = {"pooled": (3,)}


def _relations(x: torch.Tensor, teacher: torch.Tensor, student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """RKD's terms of a batch whose student features are ``student(x)``."""
    terms = build("rkd", POOLED, POOLED).losses(step({"pooled": student(x)}, {"pooled": teacher}))
    return {name: terms[name] for name in ("rkd_distance", "rkd_angle")}


def _batch_and_student() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    g = torch.Generator().manual_seed(2)
    x, teacher = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
    torch.manual_seed(0)
    return x, teacher, torch.nn.Linear(4, 3)


def _per_process_relations(rank: int, size: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.set_num_threads(1)
    x, teacher, student = _batch_and_student()
    terms = _relations(x[rank::size], teacher[rank::size], student)  # this process's shard, as the loader deals it
    sum(terms.values()).backward()
    gradients = [p.grad for p in student.parameters()]
    average_(gradients, World(rank, size))
    torch.save({"terms": {k: v.item() for k, v in terms.items()}, "gradients": gradients}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_relation_loss_on_two_processes_is_the_mean_of_its_shards_losses_by_hand(tmp_path):
    """RKD's documented rule on several processes: distances and angles within each process's shard (as
    mdistiller's DataParallel forward per GPU chunk), the gradient the mean of the shards': each process's terms
    equal the plain-Python computation on its shard, and the averaged gradient is that of the mean of the two
    shards' losses, not of the whole batch's."""
    mp.spawn(_per_process_relations, args=(2, _free_port(), tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, teacher, student = _batch_and_student()
    for rank, saved in enumerate(ranks):
        with torch.no_grad():
            l_d, l_a = rkd_by_hand(student(x[rank::2]).tolist(), teacher[rank::2].tolist())
        assert saved["terms"]["rkd_distance"] == pytest.approx(25 * l_d, rel=1e-5)
        assert saved["terms"]["rkd_angle"] == pytest.approx(50 * l_a, rel=1e-5)
    shards = sum(sum(_relations(x[r::2], teacher[r::2], student).values()) for r in range(2)) / 2
    by_rule = torch.autograd.grad(shards, list(student.parameters()))
    whole = torch.autograd.grad(sum(_relations(x, teacher, student).values()), list(student.parameters()))
    for averaged, expected, other in zip(ranks[0]["gradients"], by_rule, whole):
        torch.testing.assert_close(averaged, expected, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(averaged, other, rtol=1e-3)
    torch.testing.assert_close(ranks[1]["gradients"][0], ranks[0]["gradients"][0])  # one update on every process


def _crd_steps(rank: int, size: int, port: int, out: Path) -> None:
    """Two CRD steps on ``size`` processes: a global batch of 4 positions, then a last batch of 3 (shards of 2 and 1
    on two processes); each process's term, its shard's size, the banks, Z and the averaged first-step gradients."""
    from kdbench.methods.base import Preparation
    from kdbench.methods.crd import CRD

    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.set_num_threads(1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    torch.manual_seed(0)
    crd = CRD(method_context("crd", {"pooled": (3,)}, {"pooled": (5,)}, "crd", {"nce_k": 3}, batch_size=4 // size,
                             num_train=8, seed=0))
    crd.prepare(Preparation(None, None, None, None, torch.device("cpu"), train_labels=labels))
    crd.world = World(rank, size)
    g = torch.Generator().manual_seed(3)
    saved = {"terms": [], "banks": []}
    for batch in ([5, 2, 7, 0], [1, 6, 3]):
        index = torch.tensor(batch)
        student, teacher = (torch.randn(len(batch), width, generator=g).relu() for width in (3, 5))
        mine = slice(rank, None, size)  # the loader's deal
        logits = torch.randn(len(batch), 100)[mine]  # not used by the term
        term = crd.losses(StepOutputs(labels[index][mine], logits, {"pooled": student[mine]}, logits,
                                      {"pooled": teacher[mine]}, indices=index[mine]))["crd"]
        if not saved["terms"]:
            term.backward()
            gradients = [p.grad for p in crd.parameters()]
            average_(gradients, crd.world)
            saved["gradients"] = gradients
        saved["terms"].append((term.item(), len(index[mine])))
        saved["banks"].append((crd.memory_v1.clone(), crd.memory_v2.clone(), crd.params.clone()))
    torch.save(saved, out / f"crd-{size}-{rank}.pt")
    if size > 1:
        dist.destroy_process_group()


@pytest.mark.slow
def test_crd_on_two_processes_keeps_one_bank_and_draws_one_processs_negatives(tmp_path):
    """Gathered positions and embeddings: after each step both processes' banks and Z equal one process's on the
    whole batch (a smaller last batch included), and the shards' terms recombine to its term (the same negatives);
    the first step's averaged gradients equal its gradients."""
    _crd_steps(0, 1, 0, tmp_path)
    mp.spawn(_crd_steps, args=(2, _free_port(), tmp_path), nprocs=2)
    one, *two = (torch.load(tmp_path / f"crd-{n}-{r}.pt") for n, r in ((1, 0), (2, 0), (2, 1)))
    for k in range(2):
        for rank in two:
            for mine, theirs in zip(rank["banks"][k], one["banks"][k]):
                torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
        recombined = sum(t * n for t, n in (r["terms"][k] for r in two)) / sum(r["terms"][k][1] for r in two)
        assert recombined == pytest.approx(one["terms"][k][0], rel=1e-5)
    for mine, theirs in zip(two[0]["gradients"], one["gradients"]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


def _fits(rank: int, size: int, port: int, out: Path) -> None:
    """CRD's fit (its training labels) through fit_once, on processes whose modules start different; then a fit that
    fails on rank 0."""
    from kdbench.distributed import fit_once
    from kdbench.errors import RunFailed
    from kdbench.methods.base import Preparation
    from kdbench.methods.crd import CRD

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # different banks and embeddings on each process before the fit
    crd = CRD(method_context("crd", {"pooled": (3,)}, {"pooled": (5,)}, "crd", {"nce_k": 3}, batch_size=2,
                             num_train=8, seed=0))
    crd.world = World(rank, size)
    fitted_as: list[tuple[int, int]] = []

    def fit() -> None:
        fitted_as.append((crd.world.rank, crd.world.size))
        crd.prepare(Preparation(None, None, None, None, torch.device("cpu"),
                                train_labels=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])))

    def fail() -> None:
        raise RunFailed("no points to cluster")

    fit_once(crd, fit)
    try:
        fit_once(crd, fail)
        failure = ""
    except RunFailed as error:
        failure = str(error)
    torch.save({"fitted_as": fitted_as, "state": crd.state_dict(), "negatives": crd.num_negatives,
                "failure": failure, "world": (crd.world.rank, crd.world.size)}, out / f"fit{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_methods_fit_runs_once_on_rank_0_and_every_process_trains_with_it(tmp_path):
    """Rank 0 fits as one process (its method's world is one process meanwhile), rank 1 does not fit and ends with
    rank 0's state, every tensor of it, bank and embeddings included, its host copies reloaded; a failed fit on rank
    0 ends the run on rank 1 too, in one line naming it."""
    mp.spawn(_fits, args=(2, _free_port(), tmp_path), nprocs=2)
    zero, one = (torch.load(tmp_path / f"fit{r}.pt") for r in range(2))
    assert zero["fitted_as"] == [(0, 1)] and one["fitted_as"] == []
    assert (zero["world"], one["world"]) == ((0, 2), (1, 2))
    assert zero["state"].keys() == one["state"].keys() and len(zero["state"]) > 5
    for key, value in zero["state"].items():
        assert torch.equal(one["state"][key], value), key
    assert torch.equal(one["state"]["train_labels"], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert zero["negatives"] == one["negatives"] == 3
    assert zero["failure"] == "no points to cluster"
    assert one["failure"] == "RunFailed on process 0 while fitting: no points to cluster"


def test_what_several_processes_cannot_train_is_refused_in_one_line(monkeypatch):
    with pytest.raises(KdbenchError, match="global batch of 32 over 3 processes must split evenly"):
        tiny_sweep(methods=("kd",), world_size=3).plan()
    with pytest.raises(KdbenchError, match="--sync-bn synchronises BatchNorm over the processes of a run"):
        tiny_sweep(methods=("kd",), sync_bn=True).plan()
    assert tiny_sweep(methods=("letkd1",), world_size=2).plan()  # its fit runs once, on rank 0
    from kdbench.config import world_size

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size(None) == 4
    with pytest.raises(KdbenchError, match="--gpus-per-run 2 in a process group of 4"):
        world_size(2)


def test_the_world_size_and_batchnorm_rule_are_part_of_the_run_and_its_setting():
    one, two = (tiny_sweep(methods=("kd",), world_size=n, sync_bn=n > 1).plan() for n in (1, 2))
    assert [r.world_size for r in one] == [None, None] and [r.world_size for r in two] == [2, 2]
    assert {r.run_id for r in one}.isdisjoint(r.run_id for r in two)
    assert one == tiny_sweep(methods=("kd",)).plan()  # one process is no setting: run ids as before


def test_the_slurm_script_in_the_scale_out_guide_parses(tmp_path):
    """It is not submitted (no SLURM here): bash parses it, and it runs kdbench under torchrun with SLURM's nodes."""
    page = (ROOT / "docs" / "scale-out.md").read_text()
    script = page.split("<!-- sbatch:start -->\n```sh\n")[1].split("```\n<!-- sbatch:end -->")[0]
    (tmp_path / "kdbench-ddp.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "kdbench-ddp.sbatch")], check=True)
    assert script.startswith("#!/bin/bash\n#SBATCH") and "srun torchrun --nnodes \"$SLURM_NNODES\"" in script
    assert "-m kdbench run" in script


def _rank_process(rank: int, results: str) -> int:
    """The pid of process ``rank`` of the group that writes ``results``, from its environment (torchrun's RANK)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and results.encode() in cmdline:
            return int(pid)
    raise AssertionError(f"no process of rank {rank} writes {results}")


@pytest.mark.slow
def test_a_killed_process_stops_its_group_in_one_line_and_the_command_resumes_to_the_same_weights(tmp_path):
    """SAKD, whose fit (its prefitted head) rank 0 computes and broadcasts: the resumed group restores the fitted
    head with the rest of the checkpoint, on both processes, and ends where an uninterrupted group ends."""
    args = ["--methods", "sakd", "--pairs", "resnet14:resnet8", "--dataset", "synthetic", "--recipe", "short",
            "--epochs", "4", "--teacher-epochs", "1", "--train-subset", "256", "--teacher-train-subset", "128",
            "--batch-size", "64", "--device", "cpu", "--gpus-per-run", "2"]
    assert _kdbench(*args, "--results-dir", "whole", cwd=tmp_path).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    group = subprocess.Popen([sys.executable, "-m", "kdbench", "run", *args, "--results-dir", "killed"], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not list(tmp_path.glob("killed/student-sakd-*/latest.pt")):  # the student's first epoch is saved
        assert group.poll() is None, group.communicate()[1][-2000:]
        time.sleep(0.05)
    os.kill(_rank_process(1, "killed"), signal.SIGKILL)
    _, err = group.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith("kdbench: error")]
    assert group.returncode == 1 and errors == [errors[0]], err[-2000:]
    assert "process 1 of 2 stopped the run's group: Signal 9 (SIGKILL)" in errors[0]
    again = _kdbench(*args, "--results-dir", "killed", cwd=tmp_path)
    assert again.returncode == 0 and "resumes at epoch" in again.stderr
    whole, resumed = (torch.load(next(tmp_path.glob(f"{d}/student-sakd-*/model.pt"))) for d in ("whole", "killed"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)  # bit for bit, as one process resumes


# Loaded at start-up by every Python process of the test (sitecustomize): on process 1 of a group, FitNet's step
# raises, a bug of one method on one process.
RAISES_ON_PROCESS_1 = """
import os
if os.environ.get("RANK") == "1":
    from kdbench.methods.fitnet import FitNet

    def losses(self, out):
        raise RuntimeError("an injected bug in fitnet")

    FitNet.losses = losses
"""


@pytest.mark.slow
def test_a_process_that_raises_fails_its_run_in_one_line_and_the_sweep_goes_on(tmp_path):
    torch.manual_seed(0)
    torch.save(create_model("resnet14", 10, 3).state_dict(), tmp_path / "teacher.pt")
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(RAISES_ON_PROCESS_1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-m", "kdbench", "run", "--methods", "fitnet,kd", "--pairs",
                           "resnet14:resnet8", "--dataset", "synthetic", "--recipe", "short", "--epochs", "1",
                           "--train-subset", "128", "--batch-size", "64", "--device", "cpu", "--teacher-ckpt",
                           "teacher.pt", "--gpus-per-run", "2", "--results-dir", "r"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = done.stderr.splitlines()
    errors = [n for n, line in enumerate(lines) if line.startswith("kdbench: error")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
    assert re.match(r"kdbench: error: process 1 of 2 failed run student-fitnet-\S+: RuntimeError: an injected bug in "
                    r"fitnet; it is recorded as failed, and a new process group goes on", lines[errors[0]])
    from kdbench.results import ResultsStore

    store = ResultsStore(tmp_path / "r")
    records = {r.spec.method: r for r in map(store.load_record, (d.name for d in store.root.glob("student-*")))}
    assert records["fitnet"].status == "failed"
    assert "process 1 of 2 raised RuntimeError: an injected bug in fitnet" in records["fitnet"].error
    assert records["kd"].status == "finished" and records["kd"].spec.world_size == 2
    finished_kd = next(n for n, line in enumerate(lines) if re.search(r"student-kd-\S+ .*finished", line))
    assert finished_kd > errors[0]  # after the failure, in the new group


@pytest.mark.slow
def test_under_ray_a_run_of_two_processes_is_a_ray_train_group_with_the_local_groups_numbers(tmp_path):
    """--executor ray --gpus-per-run 2: a TorchTrainer of two gloo workers per run, scheduled as Ray runs are;
    its weights are the elastic launcher's bit for bit (the same collectives on the same shards)."""
    args = ["--methods", "kd", "--pairs", "resnet14:resnet8", "--dataset", "synthetic", "--recipe", "short",
            "--epochs", "2", "--teacher-epochs", "1", "--train-subset", "128", "--teacher-train-subset", "128",
            "--batch-size", "64", "--device", "cpu", "--gpus-per-run", "2"]
    ray_run = _kdbench(*args, "--executor", "ray", "--results-dir", "ray", cwd=tmp_path)
    local = _kdbench(*args, "--results-dir", "local", cwd=tmp_path)
    assert (ray_run.returncode, local.returncode) == (0, 0), ray_run.stderr[-2000:]
    from kdbench.results import ResultsStore

    for kind in ("teacher-student", "student-kd"):
        ray_dir, local_dir = (next(tmp_path.glob(f"{d}/{kind}-*")) for d in ("ray", "local"))
        assert ResultsStore(tmp_path / "ray").load_record(ray_dir.name).provenance["process_group_backend"] == "gloo"
        a, b = (torch.load(d / "model.pt") for d in (ray_dir, local_dir))
        assert all(torch.equal(a[k], b[k]) for k in a), kind


@pytest.mark.slow
def test_every_method_trains_with_two_processes(tmp_path):
    """One epoch of every shipped method but TAKD/DGKD (which need an assistant chain), each process on its shard,
    those with an offline fit (letKD, OFD, SAKD, SimKD, CAT-KD, CRD) fitted on rank 0: each finishes."""
    from kdbench.methods import list_methods, method_class

    methods = [m for m in list_methods() if method_class(m).__module__.startswith("kdbench.methods.")
               and not method_class(m).uses_assistants and m != "student"]
    assert {"crd", "letkd2", "ofd", "sakd", "simkd", "catkd"} <= set(methods)
    done = _kdbench("--methods", ",".join(methods), "--pairs", "resnet14:resnet8", "--dataset", "synthetic",
                    "--recipe", "short", "--epochs", "1", "--teacher-epochs", "1", "--train-subset", "128",
                    "--teacher-train-subset", "128", "--batch-size", "64", "--device", "cpu", "--gpus-per-run", "2",
                    "--results-dir", "all", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    from kdbench.results import ResultsStore

    store = ResultsStore(tmp_path / "all")
    finished = {r.spec.method for r in map(store.load_record, (d.name for d in store.root.glob("student-*")))
                if r.status == "finished" and r.spec.world_size == 2}
    assert finished == set(methods) and len(methods) >= 20


@pytest.mark.slow
def test_a_group_that_trains_its_own_teacher_says_so_once_and_is_not_held_by_the_pricing(tmp_path):
    """Without teacher options kdbench prices the teacher it will train before anything starts, by timing a few
    steps: that happens once, in the launching process, before the group exists (priced inside the group, it
    waited for the other processes' collectives)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "KDBENCH_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "kdbench", "run", "--methods", "kd", "--pairs", "resnet14:resnet8",
                           "--dataset", "synthetic", "--recipe", "short", "--epochs", "1", "--train-subset", "64",
                           "--test-subset", "64", "--batch-size", "64", "--device", "cpu", "--gpus-per-run", "2",
                           "--results-dir", "r"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sum("trains first, with recipe short-teacher" in line for line in done.stderr.splitlines()) == 1


def _odd_cases(rank: int, size: int, port: int, out: Path) -> None:
    from kdbench.distributed import SyncBatchNormCPU, join

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size))
    join(torch.device("cpu"))
    torch.set_num_threads(1)
    found = {}
    try:  # a gradient on one process only
        average_([torch.ones(3), torch.ones(2) if rank == 0 else None], World(rank, size))
    except Exception as error:
        found["mismatch"] = type(error).__name__
    g = torch.Generator().manual_seed(rank)
    x = (300 + 0.01 * torch.randn(4, 3, 5, 5, generator=g)).requires_grad_()  # large mean, tiny spread
    norm = SyncBatchNormCPU(3).train()
    y = norm(x)
    y.square().sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = SyncBatchNormCPU(3).train()(torch.nn.functional.conv2d(x.detach(), torch.ones(3, 3, 1, 1)))
    found.update(finite=bool(torch.isfinite(y).all() and torch.isfinite(x.grad).all()), std=y.std().item(),
                 bf16=z.dtype == torch.bfloat16 and bool(torch.isfinite(z).all()))
    torch.save(found, out / f"odd{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_gradient_on_one_process_only_fails_the_run_everywhere_and_sync_bn_stays_exact(tmp_path):
    """Every process agrees to fail (RunFailed) instead of pairing the wrong gradients; SyncBatchNormCPU takes
    two passes for the variance (inputs with mean 300 and spread 0.01 normalise to about a unit spread, with finite
    gradients, where one pass, E[x^2] - E[x]^2, cancels to nothing) and keeps its statistics in fp32 under bf16
    autocast."""
    for key in ("RANK", "WORLD_SIZE"):  # set by _odd_cases in the children only
        assert key not in os.environ
    mp.spawn(_odd_cases, args=(2, _free_port(), tmp_path), nprocs=2)
    for rank in range(2):
        found = torch.load(tmp_path / f"odd{rank}.pt")
        assert found["mismatch"] == "RunFailed" and found["finite"] and found["bf16"]
        assert 0.5 < found["std"] < 1.5  # each process's share of a unit spread over both
