#!/usr/bin/env bash
# The GPU checks, in one go, for the day a GPU is lent: the CUDA tests, the inference and training
# benchmarks in bf16, a 1-GPU DDP and FSDP2 smoke run under torchrun. Writes one markdown report
# (default benchmarks/results/gpu-check.md; argument 1 overrides) and exits non-zero if any part
# failed. Without a CUDA device it stops at once, saying so (exit 2). About 5-8 minutes on an H100.
#   bash scripts/gpu_check.sh [REPORT.md]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
REPORT="${1:-benchmarks/results/gpu-check.md}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" - <<'EOF'
import sys, torch
sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)
EOF
then
  echo "gpu_check.sh: no CUDA device visible to torch ($("$PY" -c 'import torch; print("torch", torch.__version__, "built with CUDA", torch.version.cuda)' 2>&1)); run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
  exit 2
fi

mkdir -p "$(dirname "$REPORT")"
LOGDIR="$(mktemp -d)"
TMP_REPORT="$(mktemp "${REPORT}.XXXX")"
trap 'rm -f "$TMP_REPORT"' EXIT
failed=()

section() {  # section TITLE LOGNAME CMD...: run CMD, put its status and the tail of its output in the report
  local title="$1" log="$LOGDIR/$2.log"; shift 2
  echo "gpu_check.sh: $title ..." >&2
  local t0=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || failed+=("$title (exit $rc)")
  { echo "## $title"; echo; echo "\`$*\` -> exit $rc, $((SECONDS - t0)) s"; echo; echo '```'
    tail -n 40 "$log"; echo '```'; echo; } >>"$TMP_REPORT"
}

{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"; echo
  "$PY" - <<'EOF'
import torch, platform
p = torch.cuda.get_device_properties(0)
print(f"- GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
      f"{torch.cuda.device_count()} visible")
print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 supported: {torch.cuda.is_bf16_supported()}")
print(f"- host: {platform.node()}, {platform.processor() or platform.machine()}")
EOF
  echo; git log -1 --format='- commit %h %s' 2>/dev/null; echo
} >"$TMP_REPORT"

# Tests that exercise CUDA (selected by name; pytest's exit 5 = none collected counts as a pass).
cuda_tests() {
  "$PY" -m pytest tests -q -p no:cacheprovider -k "cuda or gpu" "$@"; local rc=$?
  [ $rc -eq 5 ] && { echo "no CUDA tests collected"; return 0; }; return $rc
}
section "CUDA tests (pytest -k 'cuda or gpu')" tests cuda_tests
section "Inference benchmark, bf16 (bench_inference.py --device cuda)" inference \
  "$PY" benchmarks/bench_inference.py --device cuda --dtypes bf16 --repeats 3 --tag gpu-check
section "Training benchmark, bf16 (bench_train.py --cases amp_bf16 bf16)" train \
  "$PY" benchmarks/bench_train.py --cases amp_bf16 bf16 --steps 3

smoke() {  # smoke MODE: 2 training steps of a tiny model on 1 GPU under torchrun
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/bench_train.py \
    --distributed-smoke "$1"
}
section "DDP smoke (torchrun, 1 GPU)" ddp smoke ddp
section "FSDP2 smoke (torchrun, 1 GPU)" fsdp smoke fsdp

{
  echo "## Summary"; echo
  if [ ${#failed[@]} -eq 0 ]; then echo "All parts passed."; else printf -- '- FAILED: %s\n' "${failed[@]}"; fi
  echo; echo "Full logs: $LOGDIR"
} >>"$TMP_REPORT"
mv "$TMP_REPORT" "$REPORT"
trap - EXIT
echo "gpu_check.sh: report written to $REPORT" >&2
[ ${#failed[@]} -eq 0 ]
