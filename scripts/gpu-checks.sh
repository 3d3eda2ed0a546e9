#!/usr/bin/env bash
# The project's checks that need a GPU, as one script (a GPU machine is lent only briefly).
#
#   bash scripts/gpu-checks.sh [OUT_DIR]
#
# Runs with the python3 on the PATH. If a folder .whl/ holds wheels (packages the GPU machine
# lacks, see docs/performance.md), they are installed into /tmp/site first. Each step has its
# own time limit so that one hang does not cost the others; logs and JSON land in OUT_DIR.
set -u
OUT_DIR=${1:-${OUT:-/tmp/gpu-checks}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
export INTERP_HARNESS_CACHE=/tmp/harness-cache
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi

step() {  # step NAME SECONDS COMMAND...: run, log to OUT_DIR/NAME.log, report the status
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - start)) s"
  tail -n "${TAIL:-6}" "$OUT_DIR/$name.log"
}

nvidia-smi -L
python3 -c "import torch, transformers, transformer_lens, trl; print('torch', torch.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), '| transformers',
transformers.__version__, '| trl', trl.__version__)"

# 1. The toy suite on the GPU, one process and two xdist workers, JSON reports to compare.
step checks-cuda 120 python3 -m pytest checks/ -q --harness-device cuda \
  --harness-report-json "$OUT_DIR/checks-cuda.json"
step checks-cuda-xdist 120 python3 -m pytest checks/ -q -n 2 --harness-devices cuda:0 \
  --harness-report-json "$OUT_DIR/checks-cuda-xdist.json"
# 2. The engine against TransformerLens's patching functions, models on the GPU.
step engine-tests-cuda 240 env HARNESS_TEST_DEVICE=cuda python3 -m pytest -q -x \
  tests/test_patching.py tests/test_toy_patching.py tests/test_attribution.py \
  tests/test_memory_budget.py
# 3. Benchmarks.
TAIL=8 step bench-patching-cuda 240 python3 bench/bench_patching.py --device cuda \
  --json "$OUT_DIR/bench_patching_cuda.json"
for budget in 2048 256; do
  TAIL=5 step bench-throughput-cuda-$budget 120 python3 bench/bench_throughput.py --device cuda \
    --prompts 1000 --budget-mb $budget --json "$OUT_DIR/bench_throughput_cuda_$budget.json"
done
# 4. The toy RLHF recipe on the GPU through accelerate (one process), then two processes on
#    the one GPU (NCCL may refuse two ranks on one device; the log says).
echo '{"device": "cuda"}' >/tmp/rlhf-cuda.json
step train-accelerate-1 300 accelerate launch --num_processes 1 --mixed_precision no \
  -m harness.train /tmp/rlhf-cuda.json
cat /tmp/harness-cache/rlhf/*/rlhf_report.json > "$OUT_DIR/rlhf_report_cuda.json" 2>/dev/null
echo '{"device": "cuda", "steps": 4, "eval_prompts": 0, "n_prompts": 256, "seed": 5}' \
  >/tmp/rlhf-2proc.json
step train-accelerate-2proc 150 accelerate launch --multi_gpu --num_processes 2 \
  --mixed_precision no -m harness.train /tmp/rlhf-2proc.json
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
