#!/usr/bin/env bash
# The GPU checks of a session lent the device machine, as one command that ends inside its 10-minute limit:
#
#   bash benchmarks/gpu_session.sh "$OUT"              on the device (run with carry [".whl"], timeout_s 600)
#   bash benchmarks/gpu_session.sh /tmp/gpu --check    here, on the CPU, tiny: checks that every step runs
#
# Each step runs under its own time limit and writes into OUTDIR (8 files at most, as the device returns):
#   summary.txt             one line per step: exit status and seconds
#   tests.log               every CUDA test (pytest -k cuda): the counts are on its last line
#   train.log, train_*.json the training-step overhead (benchmarks.train_step): the Balle autoencoder (preset
#                           gpu, fp32, as the H100 figure of docs/benchmarks.md) and ResNet-50 (gpu-resnet50:
#                           batch 64 of 224x224, channels_last, bf16 autocast), eager and compiled, the peer beside
#   convergence.log, convergence/results.json, convergence/table.md
#                           the convergence study's GPU configuration (128 channels, 5x5, batch 16 of 128x128),
#                           trimmed to fit: 2000 steps, two learning rates, two seeds, spatial / rfft / rdft
#
# The device has torch, torchvision and timm but not CompressAI (the autoencoder's GDN) or pytorch-parametrizations
# (the peer). Carry their wheels for its Python 3.12 in .whl (ignored by git; fetched here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_34_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     compressai==1.2.8 pytorch-parametrizations==1.0.0 pytorch-msssim==1.0.0 ).
set -u
out=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR [--check]}
check=${2:-}
mkdir -p "$out/convergence"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
py=${PYTHON:-python3}

step() {  # NAME SECONDS LOG COMMAND...: run COMMAND under a time limit, its output appended to LOG
    local name=$1 limit=$2 log=$3 start=$SECONDS
    shift 3
    echo "== $name: $*" >> "$log"
    timeout "$limit" "$@" >> "$log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
}

if [ "$check" = "--check" ]; then
    device=cpu
    train_ae=(--preset cpu-small --repeats 1 --steps 1 --warmup 1)
    train_resnet=(--preset cpu-resnet50 --repeats 1 --steps 1 --warmup 1)
    convergence=(--config cpu --steps 20 --seeds 0 --lrs 1e-3 --variants spatial rfft --no-plot)
else
    device=cuda
    train_ae=(--preset gpu --repeats 9 --steps 10)
    train_resnet=(--preset gpu-resnet50 --repeats 7 --steps 5 --variants spatial rfft rdft peer)
    convergence=(--config gpu --steps 2000 --seeds 0 1 --lrs 3e-4 1e-3 --variants spatial rfft rdft --no-plot)
fi

{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } >> "$out/summary.txt" 2>&1
step tests 150 "$out/tests.log" "$py" -m pytest -q -p no:cacheprovider -k cuda tests
step train_autoencoder 120 "$out/train.log" "$py" -m benchmarks.train_step --device "$device" "${train_ae[@]}" \
    --json "$out/train_autoencoder.json"
step train_resnet50 150 "$out/train.log" "$py" -m benchmarks.train_step --device "$device" "${train_resnet[@]}" \
    --json "$out/train_resnet50.json"
step convergence 150 "$out/convergence.log" "$py" -m benchmarks.convergence --device "$device" "${convergence[@]}" \
    --out "$out/convergence"
