#!/usr/bin/env bash
# The one command a device call runs: GPU set-up from .whl, the WKV check, state-tuning benchmarks, results
# under $OUT. Usage (repo root, on the lent machine; carry .whl and, when you have it, .triton):
#
#   bash bench/gpu_run.sh PLAN [SECONDS]
#
# PLAN: one    one GPU: 1.5B (a) bf16, (b) bf16/int8/nf4, (c) bf16, WKV check, then (a) variants (no grad_cp,
#              compiled blocks, fla chunk 16), as far as SECONDS allow
#       final  all models: (a) bf16, (b) bf16/int8/nf4, (c) bf16 split over the GPUs, then 1.5B (a) DDP
#       ddp    only the DDP row and its single-GPU twin (ROW_ARGS adds options to both, e.g. "--compile on")
#       speed  two GPUs: GPU 1 pretrains the demo model (pretrain/, PRETRAIN_S s of training; carry pretrain/data),
#              then the evaluation-cost bench and the WKV check; GPU 0 the 1.5B rows: (a) eager and compiled,
#              (b) bf16/int8/nf4, (c) eager and compiled
#       graphs one GPU: the GPU tests (CUDA-graph replays vs eager), then rows with CUDA graphs: 1.5B (a) compiled and
#              eager, (c) compiled, (b) bf16, then 0.1B, 0.4B, 2.9B (a) compiled
#       chunk  one GPU: our chunked kernel's GPU tests, its check (bf16, fp32) and time per launch setting; then
#              1.5B (c) packed and (a) with the default kernel (chunk), and (a) with fla, all graphs + compile
#       keep   one GPU: 1.5B (a) with graphs + compile + selective and grad_cp_keep for each of KEEPS (default "2"),
#              then (c) packed with the first of KEEPS (call AL ran the plan memfix, since folded into this one)
#       ab     one GPU, cold but for the shipped caches: 1.5B (c) packed, graphs + compile + selective, (c) again
#              with the chunked kernels of the file PREV_WKV (the same call's baseline), (a), then the chunked kernels'
#              check and GPU tests (called `fourteenth` in call AD)
#       frontier one GPU: 1.5B (a) with graphs + compile and selective recompute, selective keeping KEEP blocks
#              (default 2), no recompute, full recompute; then (c) packed without recompute
#       cold   one GPU, cold but for the shipped caches: 1.5B (a), (c) packed, graphs + compile + selective, then
#              the graph GPU tests
#       graphtests one GPU: the GPU tests of the graphed step
#       memsnap one GPU: where the memory goes, from the allocator's history: 1.5B (a) selective, (a) without
#              recompute, (c) packed selective, graphs + compile (logs.tgz profiles/memory-*.txt: the peak by site)
#       stages one GPU: Triton's loop pipelining (num_stages) of our chunked kernels: each setting of TRITON_CONFIGS
#              alone, then 1.5B (a) with graphs + compile + selective for each of STAGES (STATETUNE_WKV_CHUNK values;
#              default: Triton's 3, bwd_stages=1, bwd_stages=2), (c) packed for the first two, then a memory trace
#       keepffn one GPU, cold but for the shipped caches: 1.5B (a) with graphs + compile + selective and
#              grad_cp_keep_ffn for each of FFNS (default "0 12 15"), (c) packed likewise for each of CFFNS
#              (default "0 12"), the memory rows (b) of PRECISIONS (e.g. int8,bf16,nf4; none by default), then the
#              GPU tests of the graphed step and of the chunked kernels as far as SECONDS allow
#       dots   one GPU: our chunked kernels' products with bfloat16 operands (bf16_dots) and chunk-start states in
#              bfloat16 (bf16_states) against TF32 / float32, 4 against 8 warps for the backward (calls AQ, AR,
#              whose defaults then were 8 warps): the check with the shipped defaults, each setting of
#              TRITON_CONFIGS alone, then 1.5B (a) with graphs + compile + selective + 15 FFNs kept for each of DOTS,
#              (a) with each of FFNS (default 18) FFNs kept, (c) packed, the memory rows (b) int8/bf16/nf4, then the
#              chunked kernels' GPU tests
#       seqchunks one GPU: packed rows in chunks that start at every sequence start (seq_chunks, the default)
#              against restarts inside chunks: alone (TRITON_CONFIGS), the chunked kernels' GPU tests (both ways),
#              then 1.5B (c) and (a) in two alternating rounds with the tuned settings (tuned_row; the plan's
#              earlier forms ran in calls AT and AU: BENCHMARKS, twelfth session)
#       alltests one GPU: every GPU test file, then 1.5B (c) and (a) with the tuned settings
#       abseq  one GPU: the chunked kernels' check and GPU tests, then 1.5B (c) with the tuned settings, (c) again
#              with the chunked kernels of the file PREV_WKV, and (a)
#       slots  one GPU: as abseq, then (c) without activation recompute with PREV_WKV's kernels and with today's
#              (the memory the chunk-start states cost), then (a)
#       issue4 one GPU: every row issue 4 asks for in one run: 1.5B (a) and (c) with the tuned settings, then the
#              memory rows (b) bf16/int8/nf4 without graphs
#       memory one GPU: the memory rows, 1.5B (b) int8, bf16, nf4 (PRECISIONS) without graphs
#       sizes  one GPU: 0.4B and 2.9B (a) with graphs + compile, 1.5B (a) with the embedding table on the GPU, and
#              the memory rows: 1.5B (b) bf16/int8/nf4 without graphs
#       wkv    two GPUs: the WKV check, bf16 on GPU 0 (then pytest -m gpu there), fp32 on GPU 1
#       diag   two GPUs: GPU 1 the WKV check, evaluation cost, GPU tests; GPU 0 1.5B (a) with a cProfile, (a) without
#              NVML sampling, (b) bf16/int8/nf4; then the DDP pair (1.5B (a) on one GPU, then on both)
# SECONDS is the wall-clock budget of the whole command (default 570); stages are cut to fit it. The plans of
# earlier calls that are gone from here (BENCHMARKS.md names each call's plan) are in the git history.
# Writes to $OUT: run.log, gpu_check_wkv-<backend>-<dtypes>.log, gpu_tests.log, train_speed.json, eval_speed.md,
# logs.tgz (per-row logs and profiles), triton-cache.tgz (Triton kernels + autotune choices; unpack here with
# `tar -xzf …/triton-cache.tgz -C .` and carry .triton next time) or, when that is too large to come back,
# triton-autotune.tgz (autotune choices only), and inductor-cache.tgz (torch.compile's graphs) when small enough.
set -uo pipefail
PLAN="${1:-one}"
ROW_ARGS="${ROW_ARGS:-}"
BUDGET="${2:-570}"
T0=$(date +%s)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-/tmp/statetune-out}"
mkdir -p "$OUT"
LOGS=/tmp/statetune-logs
mkdir -p "$LOGS"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on the shared multi-GPU hosts (KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
MAX_BACK=$((15 * 1024 * 1024))  # $OUT files come back only up to 16 MiB each

left() { echo $((BUDGET - ($(date +%s) - T0))); }
stamp() { echo "=== [$(($(date +%s) - T0)) s] $*"; }

pack_results() {
  stamp "packing results"
  # allocator snapshots (train_speed --memory-snapshot): gzipped into $OUT where small enough, never into logs.tgz
  for f in "$LOGS"/profiles/memory-*.pickle; do
    [ -f "$f" ] || continue
    gzip -c "$f" > "$OUT/$(basename "$f").gz" && rm -f "$f"
    [ "$(stat -c %s "$OUT/$(basename "$f").gz")" -le "$MAX_BACK" ] || { echo "$(basename "$f") too large to return"; rm -f "$OUT/$(basename "$f").gz"; }
  done
  tar -czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null
  if [ -d .triton ]; then  # Triton kernels + autotune choices, and separately Inductor's compiled graphs
    tar -czf "$OUT/triton-cache.tgz" --exclude=.triton/inductor .triton
    if [ "$(stat -c %s "$OUT/triton-cache.tgz")" -gt "$MAX_BACK" ]; then
      echo "full Triton cache is $(du -h "$OUT/triton-cache.tgz" | cut -f1): keeping only autotune choices"
      rm -f "$OUT/triton-cache.tgz"
      find .triton -name '*.autotune.json' -print0 | tar -czf "$OUT/triton-autotune.tgz" --null -T -
    fi
    if [ -d .triton/inductor ]; then
      tar -czf "$OUT/inductor-cache.tgz" .triton/inductor
      [ "$(stat -c %s "$OUT/inductor-cache.tgz")" -le "$MAX_BACK" ] || { echo "Inductor cache too large to return"; rm -f "$OUT/inductor-cache.tgz"; }
    fi
  fi
  ls -la "$OUT"
}
trap pack_results EXIT

stamp "set-up ($PLAN, budget ${BUDGET} s)"
nvidia-smi --query-gpu=index,name,memory.total,memory.used,clocks.sm,driver_version --format=csv
# shellcheck source=bench/gpu-env.sh
# No carried cache: seed the shipped ones (fla autotune choices, torch.compile graphs). SEED_INDUCTOR=0 leaves out
# torch.compile's, so that the inductor-cache.tgz the call returns holds only the graphs of the current code.
if [ -z "$(find .triton -type f 2>/dev/null | head -1)" ]; then
  for t in bench/results/triton-*.tgz; do
    [ "${SEED_INDUCTOR:-1}" = 0 ] && [[ "$t" == *inductor* ]] && { echo "not seeding $t"; continue; }
    [ -f "$t" ] && tar -xzf "$t" && echo "seeded .triton from $t"
  done
fi
source bench/gpu-env.sh || { echo "gpu-env failed"; exit 1; }
export TORCHINDUCTOR_CACHE_DIR="$REPO/.triton/inductor"
# Fail in seconds, not after minutes of autotuning, when the image lacks something the trainer imports.
python3 -c "import pydantic, pynvml, bitsandbytes, lightning, fla.ops.rwkv7, rwkv7.train, rwkv7.quant, rwkv7.tuning" \
  || { echo "preflight import failed: add the missing wheel to bench/gpu-env.sh"; exit 1; }
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
stamp "GPUs: $NGPU; .triton holds $(find .triton -type f | wc -l) files"
SPEED=(python3 bench/train_speed.py --json "$OUT/train_speed.json" --log-dir "$LOGS/rows" --profile-dir "$LOGS/profiles")

# run_on GPU SECONDS ARGS...: train_speed rows on one GPU, cut at SECONDS
run_on() {
  local gpu=$1 secs=$2
  shift 2
  [ "$secs" -gt 30 ] || { echo "skipped (no time left): $*"; return 0; }
  CUDA_VISIBLE_DEVICES=$gpu timeout "$secs" "${SPEED[@]}" --timeout "$secs" "$@"
}

# tuned_row SECONDS WORKLOAD [ARGS...]: a 1.5B row on GPU 0 with the settings that meet issue 4 (graphs + compile +
# selective recompute, KEEP_FFN blocks keeping their FFN, default 18); workload c in packed rows
tuned_row() {
  local secs=$1 wl=$2
  shift 2
  run_on 0 "$secs" --models 1.5b --workloads "$wl" --pack "$([ "$wl" = c ] && echo on || echo off)" --graphs on \
    --compile on --grad-cp-policy selective --grad-cp-keep-ffn "${KEEP_FFN:-18}" "$@"
}

# with_prev COMMAND...: COMMAND with the chunked kernels of the file PREV_WKV (the kernels before a change; an
# untracked file in the repo root travels with the call) swapped in for it alone. Its row logs and profiles get the
# suffix -prev, so that the same row with today's kernels keeps its own.
with_prev() {
  [ -f "${PREV_WKV:-}" ] || { echo "no PREV_WKV file: skipped $*"; return 0; }
  local keep=/tmp/statetune-logs-now
  rm -rf "$keep" && mkdir -p "$keep" && mv "$LOGS"/* "$keep"/ 2>/dev/null
  cp rwkv7/wkv_chunk.py /tmp/wkv_chunk_now.py && cp "$PREV_WKV" rwkv7/wkv_chunk.py
  stamp "with the kernels of $PREV_WKV: $*"
  "$@"
  cp /tmp/wkv_chunk_now.py rwkv7/wkv_chunk.py
  find "$LOGS" -type f -print0 | while IFS= read -r -d '' f; do mv "$f" "${f%.*}-prev.${f##*.}"; done
  cp -r "$keep"/. "$LOGS"/
}
# (c) packed without activation recompute: every layer keeps its chunk-start states (the memory seq_chunks costs)
NO_CP_C=(--models 1.5b --workloads c --pack on --graphs on --compile on --grad-cp off)

# memory_rows SECONDS PRECISIONS: issue 4's memory rows, 1.5B (b) without graphs, for each of PRECISIONS
memory_rows() {
  run_on 0 "$1" --models 1.5b --workloads b --graphs off --precisions "$2"
}

# chunk_checks SECONDS: our chunked kernels' check (bf16; the defaults and TRITON_CONFIGS, by default seq_chunks=0
# as well) and their GPU tests, each cut at SECONDS
chunk_checks() {
  TRITON_CONFIGS="${TRITON_CONFIGS:-;seq_chunks=0}" wkv_check 0 "$1" bf16 chunk
  gpu_tests "$1" 0 tests/rwkv7/test_wkv_triton.py -k chunk
}

# wkv_check GPU SECONDS [DTYPES] [BACKEND]: bench/gpu_check_wkv.py; its table (rewritten after each case) in $OUT
wkv_check() {
  local gpu=$1 secs=$2 dtypes=${3:-bf16,fp32} backend=${4:-fla}
  local tag="${backend}-${dtypes//,/-}"
  stamp "WKV check ($backend, $dtypes) on GPU $gpu"
  CUDA_VISIBLE_DEVICES=$gpu timeout "$secs" python3 bench/gpu_check_wkv.py --backend "$backend" --bench \
    --dtypes "$dtypes" --log "$OUT/gpu_check_wkv-$tag.log" ${TRITON_CONFIGS:+--configs "$TRITON_CONFIGS"} \
    > "$LOGS/gpu_check_wkv-$tag.stdout" 2>&1
  echo "gpu_check_wkv $backend $dtypes rc=$?"
}

# gpu_tests SECONDS [GPU [PYTEST ARGS...]]: pytest -m gpu (default: every GPU test file) into $OUT/gpu_tests.log
gpu_tests() {
  local secs=$1 gpu=${2:-0}
  shift $(($# < 2 ? $# : 2))
  [ $# -gt 0 ] || set -- tests/rwkv7/test_gpu_quant.py tests/rwkv7/test_wkv.py tests/rwkv7/test_tuning.py \
    tests/rwkv7/test_wkv_triton.py
  stamp "GPU tests (pytest -m gpu $*)"
  [ "$secs" -gt 30 ] || { echo "GPU tests skipped (no time left)"; return 0; }
  CUDA_VISIBLE_DEVICES=$gpu timeout "$secs" python3 -m pytest -q -rA --tb=short -m gpu -p no:cacheprovider "$@" \
    > "$OUT/gpu_tests.log" 2>&1
  echo "GPU tests rc=$? ($(tail -1 "$OUT/gpu_tests.log"))"
}

# pretrain_demo GPU SECONDS: the demo model's recipe (pretrain/README.md) with a training-time budget; the
# gzipped model comes back as $OUT/pretrain-model.pth.gz, its log/loss/meta inside logs.tgz
pretrain_demo() {
  local gpu=$1 secs=$2
  stamp "GPU $gpu: pretraining the demo model (${secs} s of training)"
  CUDA_VISIBLE_DEVICES=$gpu timeout $((secs + 150)) python3 pretrain/pretrain.py --data pretrain/data \
    --out /tmp/pretrain --steps 1000000 --time-budget "$secs" > "$LOGS/pretrain.stdout" 2>&1
  echo "pretrain rc=$? ($(tail -1 "$LOGS/pretrain.stdout"))"
  if [ -f /tmp/pretrain/model.pth ]; then
    gzip -c /tmp/pretrain/model.pth > "$OUT/pretrain-model.pth.gz"
    mkdir -p "$LOGS/pretrain" && cp /tmp/pretrain/*.json /tmp/pretrain/*.csv /tmp/pretrain/*.txt "$LOGS/pretrain/" 2>/dev/null
  fi
}

eval_speed() {
  local gpu=$1 models=${2:-12x768,24x2048}
  stamp "GPU $gpu: evaluation cost"
  CUDA_VISIBLE_DEVICES=$gpu timeout 140 python3 bench/eval_speed.py --device cuda --data samples/seeds.jsonl \
    --models "$models" --n 17 > "$OUT/eval_speed.md" 2>&1
  echo "eval_speed rc=$?"; cat "$OUT/eval_speed.md"
}

ddp_row() {
  local secs
  secs=$(left)
  stamp "DDP: 1.5B (a) bf16 on $NGPU GPUs"
  [ "$NGPU" -ge 2 ] && [ "$secs" -gt 60 ] || { echo "DDP skipped (GPUs $NGPU, $secs s left)"; return 0; }
  timeout $((secs - 15)) "${SPEED[@]}" --timeout $((secs - 15)) --models 1.5b --workloads a --devices 2 $ROW_ARGS
}

case "$PLAN" in
  one)  # one GPU, most important first: targets, WKV check, GPU tests, then variants
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads a
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads b --precisions bf16,int8,nf4
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads c
    wkv_check 0 $(($(left) - 60))
    gpu_tests $(($(left) - 60))
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --grad-cp off
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --compile on
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --fla-chunk 16
    ;;
  final)
    ( run_on 1 $(($(left) - 100)) --models 0.1b,0.4b --workloads a,b,c
      run_on 1 $(($(left) - 100)) --models 0.1b,0.4b,2.9b --workloads b --precisions int8,nf4 ) &
    side=$!
    run_on 0 $(($(left) - 100)) --models 1.5b --workloads a,c
    run_on 0 $(($(left) - 100)) --models 1.5b --workloads b --precisions bf16,int8,nf4
    run_on 0 $(($(left) - 100)) --models 2.9b --workloads a,b,c
    wait "$side"
    ddp_row
    ;;
  ddp)
    run_on 0 $(($(left) - 150)) --models 1.5b --workloads a $ROW_ARGS
    ddp_row
    ;;
  speed)
    ( pretrain_demo 1 "${PRETRAIN_S:-300}"
      eval_speed 1
      wkv_check 1 $(($(left) - 15)) ) &
    side=$!
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --compile off,on
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads b --precisions bf16,int8,nf4
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads c --compile off,on
    wait "$side"
    ;;
  diag)  # two GPUs: GPU 1 the WKV check, the evaluation cost, the GPU tests; GPU 0 1.5B (a) with a cProfile of
         # three steps, (a) without NVML sampling, (b) bf16/int8/nf4; then 1.5B (a) on one GPU and under DDP on both
    ( wkv_check 1 200
      eval_speed 1 "24x2048"
      gpu_tests $(($(left) - 200)) 1 ) &
    side=$!
    run_on 0 $(($(left) - 200)) --models 1.5b --workloads a --pyprofile
    run_on 0 $(($(left) - 200)) --models 1.5b --workloads a --nvml-period 0
    run_on 0 $(($(left) - 160)) --models 1.5b --workloads b --precisions bf16,int8,nf4
    wait "$side"
    run_on 0 $(($(left) - 100)) --models 1.5b --workloads a $ROW_ARGS
    ddp_row
    ;;
  graphs)
    gpu_tests 150 0
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --graphs on --compile on,off
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads c --graphs on --compile on
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads b --graphs on
    run_on 0 $(($(left) - 20)) --models 0.1b,0.4b,2.9b --workloads a --graphs on --compile on
    ;;
  keep)  # one GPU: 1.5B (a) with graphs + compile + selective, except for the last N blocks (each N of KEEPS, 0:
         # none), which keep their activations; then (c) packed with the first N
    read -r -a keeps <<< "${KEEPS:-2}"
    for k in "${keeps[@]}"; do
      run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --graphs on --compile on --grad-cp-policy selective \
        --grad-cp-keep "$k"
    done
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads c --graphs on --compile on --pack on \
      --grad-cp-policy selective --grad-cp-keep "${keeps[0]}"
    ;;
  graphtests)  # one GPU: the GPU tests of the graphed step only
    gpu_tests $(($(left) - 10)) 0 tests/rwkv7/test_tuning.py -k graph
    ;;
  ab)  # one GPU, cold but for the shipped caches: 1.5B (c) packed with graphs + compile + selective, then (c) again
       # with PREV_WKV (a file: the chunked kernels before a change, swapped in for that row), (a), then the
       # chunked kernels' check and GPU tests
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads c --graphs on --compile on --pack on \
      --grad-cp-policy selective
    if [ -f "${PREV_WKV:-}" ]; then
      cp rwkv7/wkv_chunk.py /tmp/wkv_chunk_now.py && cp "$PREV_WKV" rwkv7/wkv_chunk.py
      for f in "$LOGS"/profiles/profile-1.5b-c-*.txt; do [ -f "$f" ] && mv "$f" "${f%.txt}-now.txt"; done  # same name
      stamp "(c) with $PREV_WKV"
      run_on 0 $(($(left) - 20)) --models 1.5b --workloads c --graphs on --compile on --pack on \
        --grad-cp-policy selective
      cp /tmp/wkv_chunk_now.py rwkv7/wkv_chunk.py
    fi
    run_on 0 $(($(left) - 200)) --models 1.5b --workloads a --graphs on --compile on --grad-cp-policy selective
    wkv_check 0 $(($(left) - 80)) bf16,fp32 chunk
    gpu_tests $(($(left) - 10)) 0 tests/rwkv7/test_wkv_triton.py -k chunk
    ;;
  frontier)  # one GPU: 1.5B (a) with graphs + compile along the memory/speed trade-off of activation recompute:
             # selective, selective keeping the last KEEP blocks (default 2), none, full; then (c) packed with none
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --graphs on --compile on --grad-cp-policy selective
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --graphs on --compile on --grad-cp-policy selective \
      --grad-cp-keep "${KEEP:-2}"
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --graphs on --compile on --grad-cp off
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --graphs on --compile on
    run_on 0 $(($(left) - 10)) --models 1.5b --workloads c --graphs on --compile on --pack on --grad-cp off
    ;;
  cold)  # one GPU, cold but for the shipped caches: the first step (and the speed) of the fast settings
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --graphs on --compile on --grad-cp-policy selective
    run_on 0 $(($(left) - 110)) --models 1.5b --workloads c --graphs on --compile on --pack on \
      --grad-cp-policy selective
    gpu_tests $(($(left) - 10)) 0 tests/rwkv7/test_tuning.py -k graph
    ;;
  chunk)  # one GPU: the chunked kernel's GPU tests (kernels, graphed packed rows), its check (bf16, fp32) and time
           # per launch setting (TRITON_CONFIGS), then 1.5B (c) packed and (a) with it, and (a) with fla
    gpu_tests 150 0 tests/rwkv7/test_wkv_triton.py tests/rwkv7/test_tuning.py -k chunk
    TRITON_CONFIGS="${TRITON_CONFIGS:-chunk=16,fwd_warps=4,bwd_warps=8}" wkv_check 0 150 bf16,fp32 chunk
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads c --graphs on --compile on --pack on
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --graphs on --compile on
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --graphs on --compile on --wkv fla
    ;;
  memsnap)  # one GPU: each row records the allocator's history (profiles/memory-<row>.txt: its peak by allocation site)
    for row in "a --grad-cp-policy selective" "a --grad-cp off" "c --pack on --grad-cp-policy selective"; do
      # shellcheck disable=SC2086 # the row's options are words
      run_on 0 $(($(left) - 20)) --models 1.5b --workloads $row --graphs on --compile on --memory-snapshot --steps 12
    done
    ;;
  stages)  # one GPU: num_stages of our chunked kernels, alone and in the step (STAGES, space-separated settings)
    TRITON_CONFIGS="${TRITON_CONFIGS:-;bwd_stages=1;bwd_stages=2;fwd_stages=1}" wkv_check 0 150 bf16 chunk
    read -r -a settings <<< "${STAGES:-fwd_stages=3 bwd_stages=1 bwd_stages=2}"
    for cfg in "${settings[@]}"; do
      stamp "(a) with STATETUNE_WKV_CHUNK=$cfg"
      STATETUNE_WKV_CHUNK="$cfg" run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --graphs on --compile on \
        --grad-cp-policy selective
    done
    for cfg in "${settings[@]:0:2}"; do
      stamp "(c) with STATETUNE_WKV_CHUNK=$cfg"
      STATETUNE_WKV_CHUNK="$cfg" run_on 0 $(($(left) - 20)) --models 1.5b --workloads c --pack on --graphs on \
        --compile on --grad-cp-policy selective
    done
    run_on 0 $(($(left) - 10)) --models 1.5b --workloads a --graphs on --compile on --grad-cp-policy selective \
      --memory-snapshot --steps 12
    ;;
  keepffn)  # one GPU, cold but for the shipped caches: what keeping the FFN activations of some blocks buys
    read -r -a ffns <<< "${FFNS:-0 12 15}"
    read -r -a cffns <<< "${CFFNS:-0 12}"
    for f in "${ffns[@]}"; do
      run_on 0 $(($(left) - 150)) --models 1.5b --workloads a --graphs on --compile on --grad-cp-policy selective \
        --grad-cp-keep-ffn "$f"
    done
    for f in "${cffns[@]}"; do
      run_on 0 $(($(left) - 110)) --models 1.5b --workloads c --pack on --graphs on --compile on \
        --grad-cp-policy selective --grad-cp-keep-ffn "$f"
    done
    if [ -n "${PRECISIONS:-}" ]; then
      memory_rows $(($(left) - 60)) "$PRECISIONS"
    fi
    gpu_tests $(($(left) - 10)) 0 tests/rwkv7/test_tuning.py tests/rwkv7/test_wkv_triton.py -k "graph or chunk"
    ;;
  dots)  # one GPU: the chunked kernels' products and stored states in bfloat16 against TF32 / float32, alone and
          # in the step, then the memory rows (b)
    TRITON_CONFIGS="${TRITON_CONFIGS:-bf16_dots=0,bf16_states=0,bwd_warps=8;bf16_states=0,bwd_warps=8;bwd_warps=8;bwd_warps=4}" \
      wkv_check 0 150 bf16 chunk
    read -r -a settings <<< "${DOTS:-bwd_warps=4 bwd_warps=8 bf16_states=0,bwd_warps=8}"
    for cfg in "${settings[@]}"; do
      stamp "(a) with STATETUNE_WKV_CHUNK=$cfg"
      STATETUNE_WKV_CHUNK="$cfg" run_on 0 $(($(left) - 240)) --models 1.5b --workloads a --graphs on --compile on \
        --grad-cp-policy selective --grad-cp-keep-ffn 15
    done
    for f in ${FFNS:-18}; do
      run_on 0 $(($(left) - 200)) --models 1.5b --workloads a --graphs on --compile on --grad-cp-policy selective \
        --grad-cp-keep-ffn "$f"
    done
    run_on 0 $(($(left) - 160)) --models 1.5b --workloads c --pack on --graphs on --compile on \
      --grad-cp-policy selective --grad-cp-keep-ffn 15
    memory_rows $(($(left) - 50)) int8,bf16,nf4
    gpu_tests $(($(left) - 10)) 0 tests/rwkv7/test_wkv_triton.py -k chunk
    ;;
  issue4)  # one GPU: every row issue 4 asks for, in one run: 1.5B (a) and (c) with the settings that meet it, then (b)
    tuned_row $(($(left) - 20)) a
    tuned_row $(($(left) - 20)) c
    memory_rows $(($(left) - 10)) bf16,int8,nf4
    ;;
  alltests)  # one GPU: every GPU test file, then (c) and (a) once more as time allows
    gpu_tests $(($(left) - 100)) 0
    tuned_row $(($(left) - 10)) c
    tuned_row $(($(left) - 10)) a
    ;;
  abseq|slots)  # one GPU: the chunk tests and check of today's kernels, then (c) with them, (c) with PREV_WKV's;
                # slots: (c) without recompute with PREV_WKV's and with today's (memory); then (a)
    chunk_checks 100
    tuned_row $(($(left) - 20)) c
    with_prev tuned_row $(($(left) - 20)) c
    if [ "$PLAN" = slots ]; then
      with_prev run_on 0 $(($(left) - 20)) "${NO_CP_C[@]}"
      run_on 0 $(($(left) - 20)) "${NO_CP_C[@]}"
    fi
    tuned_row $(($(left) - 10)) a
    ;;
  seqchunks)  # one GPU: packed rows in chunks from every sequence start (the default) against restarts inside chunks
    chunk_checks 120
    for round in 1 2; do  # (c) and (a) in turns: the call-to-call spread is ~1 %, about the difference measured
      for wl in c a; do
        stamp "round $round: ($wl)"
        tuned_row $(($(left) - 20)) $wl
      done
    done
    ;;
  memory)  # one GPU: the memory rows, 1.5B (b) without graphs, int8 first (the tightest against its target)
    memory_rows $(($(left) - 10)) "${PRECISIONS:-int8,bf16,nf4}"
    ;;
  sizes)
    run_on 0 $(($(left) - 20)) --models 0.4b,2.9b --workloads a --graphs on --compile on
    run_on 0 $(($(left) - 20)) --models 1.5b --workloads a --graphs on --compile on --emb-host off
    memory_rows $(($(left) - 20)) bf16,int8,nf4
    ;;
  wkv)  # two GPUs: the WKV check in bf16 (GPU 0, then the GPU tests there) and in fp32 (GPU 1) side by side
    ( wkv_check 1 $(($(left) - 15)) fp32 ) &
    side=$!
    wkv_check 0 300 bf16
    gpu_tests $(($(left) - 15)) 0
    wait "$side"
    ;;
  *) echo "unknown plan $PLAN (one | final | ddp | speed | diag | graphs | keep | graphtests | ab | frontier | cold |"\
          "chunk | memsnap | stages | keepffn | dots | seqchunks | alltests | abseq | slots | issue4 | memory |"\
          "sizes | wkv)"; exit 2 ;;
esac

stamp "summary"
python3 - "$OUT/train_speed.json" <<'EOF'
import json, sys
sys.path.insert(0, "bench")
from train_speed import table
rows = json.load(open(sys.argv[1])) if __import__("os").path.exists(sys.argv[1]) else []
print(table(rows))
EOF
for f in "$OUT"/gpu_check_wkv*.log; do [ -f "$f" ] || continue; tail -n 45 "$f"; done  # none: still rc 0
