#!/usr/bin/env bash
# The project's checks that need a GPU, as one script (a GPU machine is lent only briefly).
#
#   bash scripts/gpu-checks.sh [OUT_DIR]          SKIP="bench-patching train-2proc" to skip steps
#
# Runs with the python3 on the PATH. If a folder .whl/ holds wheels (packages the GPU machine
# lacks, see docs/performance.md), they are installed into /tmp/site first. Each step has its
# own time limit so that one hang does not cost the others. OUT_DIR gets summary.log (the end
# of every step's log) and a few JSON files; the full logs stay in /tmp/gpu-logs.
set -u
OUT_DIR=${1:-${OUT:-/tmp/gpu-checks}}
LOGS=/tmp/gpu-logs
mkdir -p "$OUT_DIR" "$LOGS"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
export INTERP_HARNESS_CACHE=/tmp/harness-cache
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit, log, report the status and log end
  local name=$1 limit=$2; shift 2
  case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped"; return;; esac
  local start=$SECONDS
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - start)) s"
  grep -v "it/s\]" "$LOGS/$name.log" | tail -n "${TAIL:-8}" | cut -c1-300
}

{
nvidia-smi -L
python3 -c "import torch, transformers, transformer_lens, trl; print('torch', torch.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), '| transformers',
transformers.__version__, '| trl', trl.__version__)"

# 1. The toy suite on the GPU, in one process and in two xdist workers.
TAIL=4 step checks-cuda 180 python3 -m pytest checks/ -q --harness-device cuda \
  --harness-report-json "$OUT_DIR/checks-cuda.json"
TAIL=4 step checks-cuda-xdist 180 python3 -m pytest checks/ -q -n 2 --harness-devices cuda:0 \
  --harness-report-json "$OUT_DIR/checks-cuda-xdist.json"
# 2. Measurements against TransformerLens and the bridge, models on the GPU.
TAIL=30 step engine-tests-cuda 240 env HARNESS_TEST_DEVICE=cuda python3 -m pytest -q \
  tests/test_patching.py tests/test_toy_patching.py tests/test_attribution.py \
  tests/test_memory_budget.py "tests/test_models.py::test_model_lands_on_the_requested_device"
# 2b. Every architecture on the GPU (general path against TransformerLens, DLA sums, GQA heads,
#     every claim kind through a spec) and half precision with a device map.
TAIL=20 step architectures-cuda 300 env HARNESS_TEST_DEVICE=cuda python3 -m pytest -q \
  tests/test_architectures.py tests/test_dtypes.py tests/test_attention_only.py \
  tests/test_fast_paths.py tests/test_llama_fast.py tests/test_parallel_fast.py \
  tests/test_path_patching.py
# 3. Benchmarks.
TAIL=10 step bench-patching 360 python3 bench/bench_patching.py --device cuda \
  --json "$OUT_DIR/bench_patching_cuda.json"
for budget in 2048 256; do
  TAIL=5 step bench-throughput-$budget 120 python3 bench/bench_throughput.py --device cuda \
    --prompts 1000 --budget-mb $budget --json "$OUT_DIR/bench_throughput_cuda_$budget.json"
done
# 4. The toy RLHF recipe on the GPU through accelerate (one process), then two processes on
#    the one GPU (NCCL refuses two ranks on one device: a machine with 2 GPUs is needed).
echo '{"device": "cuda"}' >/tmp/rlhf-cuda.json
TAIL=3 step train-1gpu 300 accelerate launch --num_processes 1 --mixed_precision no \
  -m harness.train /tmp/rlhf-cuda.json
cp /tmp/harness-cache/rlhf/*/rlhf_report.json "$OUT_DIR/rlhf_report_cuda.json" 2>/dev/null
echo '{"device": "cuda", "steps": 4, "eval_prompts": 0, "n_prompts": 256, "seed": 5}' \
  >/tmp/rlhf-2proc.json
TAIL=3 step train-2proc 150 accelerate launch --multi_gpu --num_processes 2 \
  --mixed_precision no -m harness.train /tmp/rlhf-2proc.json
grep -m1 -o "Duplicate GPU detected[^\"]*" "$LOGS/train-2proc.log"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
} 2>&1 | tee "$OUT_DIR/summary.log"
