#!/usr/bin/env bash
# Set up the lent GPU machine for statetune benchmarks and checks (docs: ../shared/docs/gpu.md).
#
# Here, on the CPU machine (needs PyPI), once:   bash bench/gpu-env.sh --download
#   fetches the wheels the GPU machine lacks into .whl/ (git-ignored; carry it with the run).
# There, at the start of every command, from the repo root:   source bench/gpu-env.sh
#   installs .whl/*.whl into /tmp/site (no index, no deps), puts /tmp/site and the repo on PYTHONPATH,
#   points TRITON_CACHE_DIR at .triton/ (git-ignored; carry it to skip the 2-6 min autotune) and defines
#   `save_triton_cache`, which tars that cache into $OUT; unpack it here with
#   `tar -xzf <files_at>/triton-cache.tgz -C .` and carry .triton next time.
# Wheels: fla-core 0.6.0 (the fla.ops kernels), bitsandbytes and pyrwkv-tokenizer always; pydantic (+ pydantic-core,
# annotated-types, typing-inspection, typing-extensions) only when the machine lacks pydantic (rwkv7.train and
# rwkv7.generate need it; the image listed in KINDS.md has none), ruamel.yaml likewise (pretrain/ reads its params
# through tasks.common). flash-linear-attention 0.6.0 (fla.layers/models)
# is downloaded too but installed only with STATETUNE_FLA_MODELS=1: statetune needs only fla.ops, and its
# transformers>=5.6.2 requirement would break `import fla` on an image with an older transformers.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$REPO/.whl"
FLA_VERSION=0.6.0
PYDANTIC=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions ruamel.yaml==0.19.1)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

download_wheels() {
  local python="${PYTHON:-$REPO/.venv/bin/python}" platform_args=()
  for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
  mkdir -p "$WHEELS"
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_args[@]}" -d "$WHEELS" "fla-core==$FLA_VERSION" "flash-linear-attention==$FLA_VERSION" bitsandbytes \
    pyrwkv-tokenizer==0.9.1 "${PYDANTIC[@]}"
  ls -la "$WHEELS"
}

install_wheels() {
  local wheels=("$WHEELS"/fla_core-*.whl "$WHEELS"/bitsandbytes-*.whl "$WHEELS"/pyrwkv_tokenizer-*.whl)
  if [ "${STATETUNE_FLA_MODELS:-0}" = 1 ]; then wheels+=("$WHEELS"/flash_linear_attention-*.whl); fi
  if ! python3 -c "import pydantic" 2>/dev/null; then
    wheels+=("$WHEELS"/pydantic-*.whl "$WHEELS"/pydantic_core-*.whl "$WHEELS"/annotated_types-*.whl
             "$WHEELS"/typing_inspection-*.whl "$WHEELS"/typing_extensions-*.whl)
  fi
  if ! python3 -c "import ruamel.yaml" 2>/dev/null; then wheels+=("$WHEELS"/ruamel_yaml-*.whl); fi  # tasks.common
  for w in "${wheels[@]}"; do
    [ -f "$w" ] || { echo "gpu-env: missing $w (run 'bash bench/gpu-env.sh --download' here and carry .whl)" >&2; return 1; }
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}" || return 1
  export PYTHONPATH="/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  export TRITON_CACHE_DIR="$REPO/.triton"
  mkdir -p "$TRITON_CACHE_DIR"
  python3 -c "import torch, triton, fla.ops.rwkv7, pydantic; print('gpu-env: torch', torch.__version__, '| triton',
triton.__version__, '| fla', __import__('fla').__version__, '| pydantic', pydantic.VERSION, '|',
torch.cuda.get_device_name())" || return 1
}

save_triton_cache() {
  [ -n "${OUT:-}" ] && tar -czf "$OUT/triton-cache.tgz" -C "$REPO" .triton && echo "gpu-env: saved $OUT/triton-cache.tgz"
}

if [ "${1:-}" = "--download" ]; then
  download_wheels
elif [ "${BASH_SOURCE[0]}" = "$0" ]; then
  echo "source this file on the GPU machine (or run it with --download here)" >&2
  exit 2
else
  install_wheels
fi
