#!/usr/bin/env bash
# GPU check of the VQ collections: GPU tests + the DLRM step benchmark over nccl.
#
# Target: a lent single-H200 machine (torch 2.11 cu130, Python 3.12, no internet, no fbgemm /
# torchrec). Two steps:
#
#   1. here, with internet (once):   benchmarks/gpu_check.sh prepare [full|cpu-fbgemm]
#      downloads cp312 manylinux wheels into .whl/ (git-ignored):
#        full       -> fbgemm-gpu==1.6.0 (CUDA) + torchrec==1.6.1 + torchrec's pure-Python deps
#                      (sharded path: DMP, row-wise, fused Adam). The CUDA fbgemm wheel is large;
#                      the device tool carries at most 64 MiB, so check `du -sh .whl` first.
#        cpu-fbgemm -> fbgemm-gpu-cpu==1.6.0 instead (small): unsharded path only.
#   2. on the GPU machine:           benchmarks/gpu_check.sh run
#      (device tool: command "bash benchmarks/gpu_check.sh run", carry [".whl"], timeout ~540 s)
#      installs the wheels offline (--no-index), runs tests/test_vq_modules_gpu.py and
#      benchmarks/bench_dlrm_step.py with --device cuda under torchrun (nccl), writing logs
#      and the markdown table to $OUT (or ./gpu_check_out).
#
# Budget: ~1-2 min install, ~1 min tests, ~3 min benchmark. Not run in this task (no GPU
# was lent); written to be run as is.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
WHL="$ROOT/.whl"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# torchrec's pure-Python runtime deps (torchrec is installed with --no-deps: its metadata pins
# the CUDA fbgemm-gpu, which must not replace the one we pick).
TORCHREC_DEPS=(tensordict torchmetrics lightning-utilities pyre-extensions typing-inspect mypy-extensions iopath portalocker tqdm)

prepare() {
  local flavour="${1:-full}"
  mkdir -p "$WHL"
  local fbgemm="fbgemm-gpu==1.6.0"
  [ "$flavour" = "cpu-fbgemm" ] && fbgemm="fbgemm-gpu-cpu==1.6.0"
  local target=(--dest "$WHL" --python-version 3.12 --platform manylinux2014_x86_64
                --platform manylinux_2_28_x86_64 --only-binary=:all:)
  if [ "$flavour" = "full" ]; then
    # the CUDA build for torch 2.11 / cu130 lives on the PyTorch index
    $PY -m pip download "${target[@]}" --no-deps --index-url https://download.pytorch.org/whl/cu130 "$fbgemm"
  else
    $PY -m pip download "${target[@]}" --no-deps "$fbgemm"
  fi
  $PY -m pip download "${target[@]}" --no-deps torchrec==1.6.1
  # torchrec's runtime deps with their own deps, minus what the GPU image already has
  $PY -m pip download "${target[@]}" "${TORCHREC_DEPS[@]}" pytest
  rm -f "$WHL"/torch-*.whl "$WHL"/nvidia_*.whl "$WHL"/triton-*.whl "$WHL"/numpy-*.whl
  du -sh "$WHL"
  echo "carry .whl in the device run (limit 64 MiB for the whole working tree)"
}

install() {
  [ -d "$WHL" ] || { echo "no .whl/ folder: run '$0 prepare' on a machine with internet" >&2; exit 2; }
  $PY - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
assert torch.cuda.is_available(), "no CUDA device visible"
EOF
  # offline, only what is in .whl/: every wheel but fbgemm/torchrec, skipping packages the
  # image already has (so torch's own numpy etc. stay), one by one without dependency resolution
  for whl in "$WHL"/*.whl; do
    name=$(basename "$whl" | cut -d- -f1)
    case "$name" in fbgemm_gpu*|torchrec) continue ;; esac
    if $PY -m pip show -q "$name" >/dev/null 2>&1; then continue; fi
    $PY -m pip install -q --no-index --no-deps "$whl" || echo "warn: $name not installed"
  done
  if ls "$WHL"/fbgemm_gpu-1.6.0*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --find-links "$WHL" --no-deps fbgemm-gpu==1.6.0
    FLAVOUR=full
  else
    $PY -m pip install -q --no-index --find-links "$WHL" --no-deps fbgemm-gpu-cpu==1.6.0
    FLAVOUR=unsharded
  fi
  $PY -m pip install -q --no-index --find-links "$WHL" --no-deps torchrec==1.6.1
  $PY -c "import fbgemm_gpu, torchrec; print('fbgemm_gpu', fbgemm_gpu.__version__, 'torchrec', torchrec.__version__)"
  echo "flavour: $FLAVOUR"
}

run() {
  install 2>&1 | tee "$OUT/install.log"
  FLAVOUR=$(grep '^flavour:' "$OUT/install.log" | awk '{print $2}')
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" || true
  local status=0

  # 1. GPU tests (the sharded one needs the CUDA fbgemm; -k filters it out otherwise)
  local sel=()
  [ "$FLAVOUR" = "unsharded" ] && sel=(-k "not dmp_nccl")
  timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_vq_modules_gpu.py "${sel[@]}" 2>&1 \
    | tee "$OUT/gpu_tests.log" || status=1

  # 2. benchmark: the goal point first, then the rest of the grid while time lasts (nccl, 1 GPU)
  local bench=(benchmarks/bench_dlrm_step.py --device cuda --rows 200000 --warmup 3 --steps 10
               --markdown "$OUT/dlrm_step_gpu.md")
  [ "$FLAVOUR" = "unsharded" ] && bench+=(--unsharded)
  timeout 150 $PY -m torch.distributed.run --standalone --nproc_per_node 1 "${bench[@]}" \
      --tables 26 --dims 128 --batches 8192 --ks 1024 --per-table --profile 2>&1 | tee "$OUT/bench_goal.log" || status=1
  timeout 200 $PY -m torch.distributed.run --standalone --nproc_per_node 1 "${bench[@]}" \
      --tables 8 26 --dims 64 128 --batches 2048 8192 --ks 256 1024 2>&1 | tee "$OUT/bench_grid.log" || status=1
  echo "gpu_check finished with status $status (logs in $OUT)"
  return $status
}

case "${1:-run}" in
  prepare) prepare "${2:-full}" ;;
  run) run ;;
  *) echo "usage: $0 prepare [full|cpu-fbgemm] | run" >&2; exit 2 ;;
esac
