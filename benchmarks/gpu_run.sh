#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md in one command, on a CUDA machine with the repo checked out:
#   bash benchmarks/gpu_run.sh [baseline|full|speed|next]     (results also under $OUT when set)
# Wheels for packages the machine lacks may be put in .whl/ first (installed into /tmp/site, nothing else changes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/zimage-lora-bench}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
run() {  # a row: its command, then what it printed
  echo "\$ $*" | tee -a "$OUT/results.txt"
  timeout 240 "$@" 2>&1 | grep -v Warning | tee -a "$OUT/results.txt"
  echo | tee -a "$OUT/results.txt"
}
nvidia-smi -L | tee "$OUT/results.txt"
python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/results.txt"
B="python3 benchmarks/train_step.py --config full --device cuda --dtype bf16 --steps 6 --warmup 2"
case "${1:-full}" in
  baseline)
    run $B --size 1024
    run $B --size 512
    run python3 benchmarks/generate.py --config full --size 1024 --device cuda --dtype bf16
    run python3 benchmarks/profile_step.py --config full --size 1024 --device cuda --dtype bf16 --steps 2 --warmup 2 --rows 30
    ;;
  full)
    run $B --size 1024
    run $B --size 512
    run $B --size 1024 --quant float8
    run $B --size 1024 --quant float8 --offload 0.5
    run $B --size 1024 --quant int8
    run $B --size 1024 --quant nf4
    run $B --size 1024 --compile
    run python3 benchmarks/generate.py --config full --size 1024 --device cuda --dtype bf16
    run python3 benchmarks/generate.py --config full --size 1024 --device cuda --dtype bf16 --quant float8
    run python3 benchmarks/sync_check.py --quant float8 --offload 0.5
    ;;
  speed)  # the step-time targets still open: compiled rows not measured yet
    run $B --size 1024 --compile
    run $B --size 512 --compile
    run python3 benchmarks/generate.py --config full --size 1024 --device cuda --dtype bf16 --compile
    ;;
  next)  # the open rows with less recompute (train.checkpoint_fraction; sizes from benchmarks/activations.py on the
         # CPU: compiled, 0.5 at 1024 and none at 512 should stay under 24 GB), the CPU estimate checked on the card
    run $B --size 1024 --compile --checkpoint-fraction 0.5
    run $B --size 512 --compile --no-checkpointing
    run python3 benchmarks/generate.py --config full --size 1024 --device cuda --dtype bf16 --compile
    run python3 benchmarks/activations.py --config full --size 1024 --layers 2 --device cuda --compile
    run python3 benchmarks/recompute.py --config full --size 1024 --device cuda --dtype bf16 --compile --steps 4 --warmup 2
    run python3 benchmarks/generate.py --config full --size 1024 --device cuda --dtype bf16 --loras 1 --repeats 2
    run python3 benchmarks/generate.py --config full --size 1024 --device cuda --dtype bf16 --loras 1 --no-fuse --repeats 2
    ;;
esac
