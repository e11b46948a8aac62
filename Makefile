# Set-up lives here so the README's two commands work on a fresh Debian machine:
# a virtualenv with kdbench and its dependencies, and Debian's offline Fashion-MNIST.
VENV ?= .venv
PYTHON ?= python3
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: bench test setup reference reference-pilot reference-plan reference-replay reference-costs soak notebook bench-perf bench-official bench-input gpu-check gpu-check-dry

# The main job: train a vgg13 teacher and a vgg8 baseline with the short recipe, print the table.
bench: setup
	$(VENV)/bin/kdbench run --methods student --pairs vgg13:vgg8 --dataset fashion-mnist --recipe short

# The reference result set (docs/reference-results.md): the `cpu` recipe (teachers and teacher assistants on every
# Fashion-MNIST training image but the 5,000 of the validation split, students on a fixed 1,000-image subset for 30
# epochs, every evaluation on the whole test set), five seeds, fp32, the default (official) protocol, every
# method on both pairs. It resumes where it stopped, across sessions; `make reference-plan` prices what is left
# (run it on an idle machine, and mind its price cache: see below). Failed runs stay in the set with their reasons
# (the `-` lets make go on). The pilot comes first: the teachers, CE and KD on both pairs, which
# `make reference-pilot` checks against the recipe's criteria (kdbench report --layout regime). SemCKD's default
# beta = 400 diverges on resnet56:resnet20 (docs/reference-results.md), so that pair also gets a labelled beta = 50 row. SemCKD trains at about 5 img/s on
# vgg13:vgg8, where five seeds would cost 3 of the set's 24 CPU-hours, so that row has three (SEMCKD_VGG_SEEDS);
# its n says so.
REFERENCE := results/reference-fashion-mnist-cpu
REFERENCE_METHODS := student,kd,fitnet,takd,dgkd,sakd,letkd1,letkd2
ZOO_METHODS := at,sp,cc,vid,rkd,pkt,ab,ft,fsp,nst,crd,kdsvd,ofd,reviewkd,dkd
# The logit-era methods (DIST, SimKD, CTKD, CAT-KD, KD with logit standardisation, ...) join the set on
# resnet56:resnet20 as they land.
LOGIT_ERA_METHODS := dist,simkd,ctkd,catkd,kd_ls,kd_dot,mlkd
REFERENCE_PAIRS := resnet56:resnet20,vgg13:vgg8
REFERENCE_SEEDS := 0,1,2,3,4
SEMCKD_VGG_SEEDS := 0,1,2
REFERENCE_RUN := --dataset fashion-mnist --recipe cpu --device cpu --results-dir $(REFERENCE)
PILOT_COMMAND := "--methods student,kd --pairs $(REFERENCE_PAIRS) --seeds $(REFERENCE_SEEDS)"
# One pair at a time, the cheaper first, so that a set still training has one whole table: resnet56:resnet20 with
# every method, then vgg13:vgg8 (about two thirds of the CPU time).
REFERENCE_SET := \
	"--methods $(REFERENCE_METHODS),$(ZOO_METHODS) --pairs resnet56:resnet20 --seeds $(REFERENCE_SEEDS)" \
	"--methods semckd --pairs resnet56:resnet20 --seeds $(REFERENCE_SEEDS)" \
	"--methods semckd --set semckd.beta=50 --pairs resnet56:resnet20 --seeds $(REFERENCE_SEEDS)" \
	"--methods $(LOGIT_ERA_METHODS) --pairs resnet56:resnet20 --seeds $(REFERENCE_SEEDS)" \
	"--methods $(REFERENCE_METHODS),$(ZOO_METHODS) --pairs vgg13:vgg8 --seeds $(REFERENCE_SEEDS)" \
	"--methods semckd --pairs vgg13:vgg8 --seeds $(SEMCKD_VGG_SEEDS)"
REFERENCE_COMMANDS := $(PILOT_COMMAND) $(REFERENCE_SET)
# Every row of the set must come from a clean tree of main (docs/reference-results.md): both targets refuse a tree
# with uncommitted changes. To go on working while the set trains, run it from a clean worktree of the same commit
# (git worktree add --detach ../ref HEAD; its runs record that commit, and their code fingerprints are main's). An
# editable install maps kdbench.methods to this checkout's methods/, so link the worktree's own there first
# (ln -s ../methods ../ref/kdbench/methods) and run it with PYTHONPATH=../ref: else it trains with this tree's methods.
CLEAN_TREE := git diff --quiet HEAD -- || { echo "make: commit or stash your changes first: reference runs record a clean tree (git status)"; exit 2; }
reference: setup
	@$(CLEAN_TREE)
	-for command in $(REFERENCE_COMMANDS); do $(VENV)/bin/kdbench run $$command $(REFERENCE_RUN); done
	$(VENV)/bin/kdbench report --results-dir $(REFERENCE) --plots $(REFERENCE)/plots

# The pilot that holds the `cpu` recipe to its criteria: its runs are the reference set's first, so they count there.
reference-pilot: setup
	@$(CLEAN_TREE)
	-for command in $(PILOT_COMMAND); do $(VENV)/bin/kdbench run $$command $(REFERENCE_RUN); done
	$(VENV)/bin/kdbench report --results-dir $(REFERENCE) --layout regime

# Before a change to the harness's code lands (it changes every run's fingerprint): replay the set's finished runs
# under it, from a clean tree, and commit the replayed records, so that the set stays the current code's where the
# numbers are the same (docs/reference-results.md). Teachers and assistants over their first epoch, the pilot's
# students over their first six (through the first evaluation), the other students over their first. Stops at the
# first group with a run that differs.
reference-replay: setup
	@$(CLEAN_TREE)
	$(VENV)/bin/kdbench replay --results-dir $(REFERENCE) --runs 'teacher-*,assistant-*' --epochs 1
	$(VENV)/bin/kdbench replay --results-dir $(REFERENCE) --runs 'student-student-*,student-kd-*' --epochs 6
	$(VENV)/bin/kdbench replay --results-dir $(REFERENCE) --runs 'student-*' --epochs 1

# What `make reference` has left to train, and its price, measured on this machine (writes nothing to the results).
# The pilot's runs are among the first command's; each command prices the teachers it still needs, so add the
# commands' totals without the teacher rows of the second and later ones. The dry runs keep their prices in
# ~/.cache/kdbench/prices-v2.json ($KDBENCH_CACHE/prices-v2.json) and reuse them, whatever load they were measured under:
# to price afresh on an idle machine, delete that file or point KDBENCH_CACHE elsewhere (docs/user-guide.md).
reference-plan: setup
	for command in $(REFERENCE_SET); do $(VENV)/bin/kdbench run $$command $(REFERENCE_RUN) --dry-run || exit 1; done

# The set's throughput and end-to-end costs priced again in one sitting on this machine (kdbench costs), since the runs'
# own timings come from several sessions' machines and loads (docs/user-guide.md#costs-priced-in-one-sitting); the
# report then takes them from its costs.parquet. Run it on an idle machine, once the set is made.
reference-costs: setup
	$(VENV)/bin/kdbench costs --results-dir $(REFERENCE)

# Where the step time goes (docs/performance.md): kd and semckd on vgg13:vgg8 at batch 64, on 3x32x32 inputs
# (synthetic, CIFAR's shape) and on Fashion-MNIST's 1x28x28, in fp32, bf16, bf16 + channels_last and compiled fp32
# (--compile; the first compile takes minutes on a CPU), each against a fixed batch, a bare PyTorch loop and the
# device's measured peak; then the micro-benchmarks. Run it on a quiet machine: it measures speed.
PERF := results/perf
PERF_RUN := --methods kd,semckd --pairs vgg13:vgg8 --recipe short --results-dir $(PERF) --profile
bench-perf: setup
	for data in synthetic fashion-mnist; do \
	  $(VENV)/bin/kdbench run $(PERF_RUN) --dataset $$data && \
	  $(VENV)/bin/kdbench run $(PERF_RUN) --dataset $$data --amp && \
	  $(VENV)/bin/kdbench run $(PERF_RUN) --dataset $$data --amp --channels-last && \
	  $(VENV)/bin/kdbench run $(PERF_RUN) --dataset $$data --compile || exit 1; \
	done
	$(VENV)/bin/python -m pytest tests/test_benchmarks.py -n 0 --benchmark-enable --benchmark-json=$(PERF)/micro.json

# The ImageNet input path, decoded and augmented img/s per core: kdbench's loader beside torchvision's reference
# pipeline on the same JPEGs (benchmarks/input_path.py). IMAGENET=DIR reads an ImageNet tree there, else JPEGs of
# ImageNet's size are generated. Quiet machine only.
bench-input: setup
	mkdir -p $(PERF) && $(VENV)/bin/python benchmarks/input_path.py $(if $(IMAGENET),--data-dir $(IMAGENET),--generate 2000) \
	  --workers 1 --batches 20 --out $(PERF)/input_path.csv

# kdbench beside RepDistiller's own train_student.py on this CPU, alternating (docs/performance.md); clone the
# official code first (benchmarks/official/README.md). Quiet machine only. `make gpu-check` does it on a GPU.
bench-official: setup
	bash benchmarks/official/cpu.sh

# Every check that needs a CUDA GPU, in one call of at most 8 minutes on one H100/H200 (benchmarks/gpu_check.py): the
# GPU tests, every method for an epoch, kd and semckd beside their official loops (cloned as
# benchmarks/official/README.md says), runs packed K = 1, 2, 4, 8 per GPU, CUDA graphs, --profile. One tidy table
# and a summary under GPU_CHECK_OUT. It runs with the environment's python (PYTHON), kdbench from this checkout.
# `make gpu-check-dry` runs the same commands on this machine's CPU at toy sizes: the plumbing, before a GPU is lent.
# GPU_CHECK_STAGES=trace: SemCKD's two loops under torch.profiler, a call of its own (up to 4 minutes).
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),gpu-check-out)
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(if $(GPU_CHECK_STAGES),--stages $(GPU_CHECK_STAGES))

gpu-check-dry: setup
	$(VENV)/bin/python benchmarks/gpu_check.py --cpu --out $(GPU_CHECK_OUT)

# notebooks/analysis.ipynb executed in place on the committed reference set, so that its tables and plots show on
# the repository page (the tests execute it again, on a tiny sweep, without writing it).
# The first CPU set until the set of the current cpu recipe ($(REFERENCE)) is committed.
NOTEBOOK_RESULTS := results/reference-fashion-mnist-cpu-v1
notebook: setup
	cd notebooks && KDBENCH_RESULTS=../$(NOTEBOOK_RESULTS) ../$(VENV)/bin/jupyter execute --inplace analysis.ipynb

# The suite, then the documentation site in strict mode: a broken link, reference or generated table fails (mkdocs.yml).
test: setup
	$(VENV)/bin/python -m pytest
	$(VENV)/bin/mkdocs build --strict --site-dir build/site

# Kill -9 soak of both executors (docs/scale-out.md#kill-9-soak): about 10 minutes each on a 2-core CPU.
soak: setup
	$(VENV)/bin/python tests/soak.py --executor local --kills 15
	$(VENV)/bin/python tests/soak.py --executor ray --kills 15

setup: $(VENV)/.installed $(FASHION_MNIST)

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist
