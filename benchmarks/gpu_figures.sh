#!/usr/bin/env bash
# Issue 19 point 7: every GPU figure in one go, for a machine with one NVIDIA GPU lent for a few minutes.
#
#   OUT=/some/folder bash benchmarks/gpu_figures.sh      # from the repository root; OUT defaults to ./gpu-figures
#
# Runs, each under its own `timeout` so that one part's failure or overrun never loses the other's table:
#   1. benchmarks/whole_run.py --device cuda   a real Trainer loop on the GPU, saves every k batches: no saves,
#      cairn sync/async, DCP async_save (default and pinned stager), torch.save (230 s at most);
#   2. benchmarks/checkpoint_bench.py --device cuda --no-peers   one save/load at a time (170 s at most).
# Writes to "$OUT": whole_run.txt/.json, checkpoint_bench.txt/.json, gpu.txt (the device) and summary.txt (each
# part's exit status and the target lines). Under 8 minutes in all on an H200 machine with 16 cores.
#
# Python: $PYTHON if set, else the first of .venv/bin/python and python3 whose torch sees a GPU (a CPU-only .venv,
# as `make` builds, does not; the GPU machine's own python3 holds a CUDA torch). Nothing is installed here: cairn is
# taken from src/ (PYTHONPATH), and a pure-Python dependency the machine lacks (tenacity) can be carried in a
# folder named by $DEPS (default .gpu-deps, a copy of the packages' folders from .venv's site-packages).
# Without a GPU the script says so and exits 0 at once. DRY_RUN=1 runs the same steps on the CPU with tiny settings
# (the script's plumbing only: its figures mean nothing).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-figures}
DEPS=${DEPS:-.gpu-deps}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${DEPS:+:$PWD/$DEPS}${PYTHONPATH:+:$PYTHONPATH}"

DEVICE=cuda
WHOLE_RUN=(--size-gib 1 --batches 36 --every 6 --runs 2 --batch-seconds 0.2)
BENCH=(--size-gib 1 --runs 3)
WANT='torch.cuda.is_available()'
if [ "${DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu WANT=True
    WHOLE_RUN=(--size-gib 0.05 --batches 8 --every 4 --runs 1)
    BENCH=(--size-gib 0.05 --runs 1)
fi
sees_gpu() { "$1" -c "import sys, torch; sys.exit(0 if $WANT else 1)" >/dev/null 2>&1; }

PY=""
for candidate in ${PYTHON:-} .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null 2>&1 && sees_gpu "$candidate"; then
        PY=$candidate
        break
    fi
done
if [ -z "$PY" ]; then
    echo "no GPU: no python tried (${PYTHON:+$PYTHON, }.venv/bin/python, python3) has a torch that sees a CUDA" \
        "device; nothing measured" | tee "$OUT/summary.txt"
    exit 0
fi
if ! "$PY" -c 'import cairn, cairn.trainer, cairn.checkpoint, tenacity, xxhash, torchmetrics' 2>"$OUT/summary.txt"; then
    echo "$PY cannot import cairn or one of its dependencies (above); carry the missing pure-Python packages in" \
        "$DEPS/ (e.g. cp -r .venv/lib/python3.*/site-packages/tenacity $DEPS/)" | tee -a "$OUT/summary.txt"
    exit 1
fi
{
    nvidia-smi -L 2>&1 || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.is_available()
        and torch.cuda.get_device_name())'
    echo "python: $PY; cores: $(nproc); $(uptime)"
    df -h benchmarks | tail -1
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# One part: its output to $OUT/<name>.txt as it comes (a cut-short part keeps what it printed), its exit status to
# the summary. SIGINT first: whole_run.py then prints the table of the rounds it finished; SIGKILL 15 s later.
part() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    timeout -s INT -k 15 "$limit" "$PY" "$@" >"$OUT/$name.txt" 2>&1
    local status=$?
    tail -n 25 "$OUT/$name.txt"
    case $status in
        0) echo "$name: finished" ;;
        124 | 137) echo "$name: cut short after ${limit} s (exit $status); its file holds what it printed" ;;
        *) echo "$name: FAILED (exit $status); the end of $OUT/$name.txt says why" ;;
    esac >>"$OUT/summary.txt"
}

: >"$OUT/summary.txt"
part whole_run 230 benchmarks/whole_run.py --device "$DEVICE" "${WHOLE_RUN[@]}" --json "$OUT/whole_run.json"
part checkpoint_bench 170 benchmarks/checkpoint_bench.py --device "$DEVICE" --no-peers "${BENCH[@]}" \
    --json "$OUT/checkpoint_bench.json"
grep -h -E "^(target|issue 19|without the end|cairn async per save)|^  (met |MISS)" \
    "$OUT/whole_run.txt" "$OUT/checkpoint_bench.txt" >>"$OUT/summary.txt" 2>/dev/null
echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
exit 0
