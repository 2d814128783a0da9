#!/usr/bin/env bash
# Every benchmark on a GPU at GPU sizes, under 8 minutes in all: run it whenever a GPU machine is lent.
#   scripts/gpu_check.sh [REPORT_DIR]   # one REPORT_DIR/<bench>.txt per benchmark (default runs/gpu_check)
#   scripts/gpu_check.sh --list         # the plan: each benchmark's time limit and command; runs nothing
# Each benchmark runs with --device cuda (synchronised timing, CUDA allocator peaks) under its own time
# limit; the limits add up to less than 8 minutes. One that fails or runs over is reported and the rest
# still run; the exit status is 1 if any did, 2 without a CUDA device. Two-process training setups
# (ddp, fsdp2, zero3) join bench_train_scaling when the machine has two GPUs or more. PYTHON overrides
# the interpreter. Paths are relative to the caller's folder.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[[ -x $python ]] || python=python3
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

LLAMA="--size layers=8 hidden=2048 intermediate=5504 heads=16 vocab=32000 batch=8 seq=512"
# name, time limit in seconds, arguments after scripts/<name>.py (all get --device cuda)
PLAN=(
  "bench_lora 60 --rounds 3 --steps 3 $LLAMA"
  "bench_moe 60 --rounds 3 --steps 2 --size layers=4 hidden=1024 intermediate=2816 heads=16 vocab=32000 batch=8 seq=512"
  "bench_adapters 100 --rounds 2 --steps 2 --size width=2048 depth=8 batch=8 seq=512 layers=4 hidden=1024 intermediate=2816 heads=16 vocab=32000"
  "bench_clip 40 --model ViT-B-16 --batch 128 --image 224 --rounds 3"
  "bench_train_scaling 70 --steps 20 --threads 4 --set model.hidden_size=1024 model.intermediate_size=2816 model.layers=8 model.heads=16 model.kv_heads=8 data.seq_len=512 train.batch_size=16 --setups single"
  "bench_limits 40 --rounds 2 --steps 2 --size d=16 degree=2 heads=8 batch=4 min_seq=1024 max_seq=16384"
  "bench_generate 40 --rounds 1 --steps 1 --adapters 1,32,256 --size layers=8 hidden=1024 intermediate=2816 heads=16 vocab=32000 requests=64 prompt=64 new=32 slots=64"
  "bench_serve 45 --rounds 2 --steps 2 --size layers=8 hidden=2048 intermediate=5504 heads=16 vocab=32000 seq=128 rows=4 slots=64"
)
BUDGET_S=480

if [[ ${1:-} == --list ]]; then
  for entry in "${PLAN[@]}"; do
    read -r name limit args <<<"$entry"
    echo "$name $limit scripts/$name.py --device cuda $args"
  done
  exit 0
fi
report_dir=${1:-runs/gpu_check}
gpus=$("$python" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)') || gpus=0
if [[ $gpus -lt 1 ]]; then
  echo "gpu_check.sh: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine" >&2
  exit 2
fi
mkdir -p "$report_dir" || exit 2
"$python" - <<'PY' >"$report_dir/device.txt"
import torch
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
cat "$report_dir/device.txt"
failed=() started=$SECONDS
for entry in "${PLAN[@]}"; do
  read -r name limit args <<<"$entry"
  # shellcheck disable=SC2206  # the plan's arguments are plain words
  argv=($args)
  if [[ $name == bench_train_scaling && $gpus -ge 2 ]]; then argv+=(ddp fsdp2 zero3); fi
  echo "== $name (limit ${limit}s)"
  t0=$SECONDS
  timeout --signal TERM --kill-after 10 "$limit" "$python" "$root/scripts/$name.py" --device cuda "${argv[@]}" \
    >"$report_dir/$name.txt" 2>"$report_dir/$name.err"
  status=$?
  if [[ $status -eq 0 ]]; then
    echo "   ok in $((SECONDS - t0)) s: $report_dir/$name.txt"
  else
    [[ $status -eq 124 ]] && why="over its ${limit}s limit" || why="exit $status"
    echo "   FAILED ($why) after $((SECONDS - t0)) s: see $report_dir/$name.err" >&2
    tail -n 5 "$report_dir/$name.err" >&2
    failed+=("$name")
  fi
done
echo "gpu_check: $((SECONDS - started)) s of a ${BUDGET_S} s budget; reports in $report_dir"
if [[ ${#failed[@]} -gt 0 ]]; then echo "gpu_check: failed: ${failed[*]}" >&2; exit 1; fi
