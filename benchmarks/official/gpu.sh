#!/usr/bin/env bash
# kdbench against the official loops on a CUDA GPU, in one call: the GPU-marked tests; kd and semckd on vgg13->vgg8
# and resnet32x4->resnet8x4, one epoch of fake CIFAR-100 (50,000 images), fp32 and bf16 + channels_last, beside
# RepDistiller (kd) and SemCKD (semckd) on the same data and random teachers; then `kdbench run --profile` in fp32,
# bf16 + channels_last and compiled with CUDA graphs. Most valuable first; logs and tables under $OUT. SemCKD runs at
# beta = 50 on both sides: with random teachers beta = 400 diverges within an epoch, and the weight changes no work.
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
here=$(cd "$(dirname "$0")" && pwd)
O=${OUT:-/tmp/kdbench-gpu-out}; mkdir -p "$O"
exec > >(tee -a "$O/log.txt") 2>&1
PY=${PY:-python3} D=${DATA:-/tmp/kdbench-official} R=/tmp/kdbench-gpu-runs T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
step() { local t=$1; shift; timeout -k 5 "$t" "$@" || echo "!!! exit $? ($t s limit): $*"; }
stamp env
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,memory.total --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
[ -d "$D/kdbench" ] || "$PY" "$here/fake_cifar100.py" "$D" 50000 10000 || exit 1
teacher() { echo "$D/teachers/$1_cifar100_lr_0.05_decay_0.0005_trial_0/$1_best.pth"; }
official() {  # repo, teacher, student, distill flags...
  local repo=$1 t=$2 s=$3 flag=--path_t; shift 3
  [ "$repo" = SemCKD ] && flag=--path-t
  stamp "official $repo $s $*"
  step 150 "$PY" "$here/run_official.py" "$here/repos/$repo" "$D/torchvision" train_student.py --model_s "$s" \
    --trial 0 --epochs 1 "$@" $flag "$t" 2>&1 | grep -E "total time|^ \* Epoch|Epoch: \[1\]\[(400|600)/|Error"
}
stamp gpu-tests
step 150 "$PY" -m pytest -m gpu -n 0 -p no:cacheprovider -q "$here/../../tests/test_gpu.py" \
  "$here/../../tests/test_benchmarks.py" 2>&1 | tail -6
K=("$PY" "$here/kdbench_fake.py" run --dataset cifar100 --data-dir "$D/kdbench" --no-download --device cuda)
for pair in vgg13:vgg8 resnet32x4:resnet8x4; do
  t=$(teacher "${pair%%:*}") s=${pair##*:}
  for setting in "" "--amp --channels-last"; do
    stamp "kdbench $pair $setting"
    step 200 "${K[@]}" --methods student,kd,semckd --pairs "$pair" --recipe paper --epochs 1 --teacher-ckpt "$t" \
      --set semckd.beta=50 $setting --results-dir $R 2>&1 | grep -E "finished|failed|slower|rror" | grep -v imported
  done
  official RepDistiller "$t" "$s" --distill kd -r 0.1 -a 0.9 -b 0
  official SemCKD "$t" "$s" --distill semckd -r 1 -a 1 -b 50
  "$PY" "$here/summarise.py" $R | tee "$O/runs.md"
done
for setting in "" "--amp --channels-last" "--amp --channels-last --compile reduce-overhead"; do
  stamp "profile $setting"
  step 200 "${K[@]}" --methods kd,semckd --pairs vgg13:vgg8,resnet32x4:resnet8x4 --profile --results-dir $R/profile \
    $setting 2>&1 | tail -8
  cp $R/profile/profile.csv "$O/profile.csv" 2>/dev/null
done
stamp done
