#!/usr/bin/env bash
# kdbench against RepDistiller's own train_student.py on this machine's CPU: kd on vgg13->vgg8, one epoch each on the
# same fake CIFAR-100 (5,000 train, 1,000 test images) and the same random vgg13 teacher, loops alternating, ROUNDS
# rounds. Prints one line per run: epoch img/s (train images / epoch seconds), and kdbench's steady-state img/s.
# Run it on a quiet machine: it measures speed. README.md beside this file says how to get the official code.
set -u
here=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-$here/../../.venv/bin/python} D=${DATA:-/tmp/kdbench-official} ROUNDS=${ROUNDS:-2} N=5000
[ -d "$here/repos/RepDistiller" ] || { echo "no $here/repos/RepDistiller: see $here/README.md"; exit 2; }
[ -d "$D/kdbench" ] || "$PY" "$here/fake_cifar100.py" "$D" $N 1000 || exit 1
T=$D/teachers/vgg13_cifar100_lr_0.05_decay_0.0005_trial_0/vgg13_best.pth
kdbench() {  # round, label, kdbench flags...
  local dir=$D/runs/r$1-$2; rm -rf "$dir"; mkdir -p "$D/runs"
  "$PY" "$here/kdbench_fake.py" run --methods kd --pairs vgg13:vgg8 --dataset cifar100 --data-dir "$D/kdbench" \
    --no-download --recipe paper --epochs 1 --device cpu --teacher-ckpt "$T" --results-dir "$dir" "${@:3}" \
    > "$dir.log" 2>&1 || { echo -e "$1\tkdbench-$2\tfailed: see $dir.log"; return; }
  echo -e "$1\tkdbench-$2\t$("$PY" "$here/summarise.py" --rates "$dir")"
}
repdistiller() {  # round, workers
  local t
  t=$("$PY" "$here/run_official.py" "$here/repos/RepDistiller" "$D/torchvision" train_student.py --path_t "$T" \
      --distill kd --model_s vgg8 -r 0.1 -a 0.9 -b 0 --trial 0 --epochs 1 --num_workers "$2" 2>&1 \
      | sed -n 's/^epoch 1, total time //p')
  echo -e "$1\trepdistiller-w$2\t$("$PY" -c "print(f'{$N / $t:.1f}')" 2>/dev/null || echo failed)"
}
echo -e "round\tloop\tepoch img/s\tsteady img/s"
for r in $(seq 1 "$ROUNDS"); do
  kdbench "$r" fp32
  repdistiller "$r" 2
  kdbench "$r" fp32-channels-last --channels-last
  repdistiller "$r" 8
  kdbench "$r" bf16-channels-last --amp --channels-last
done
