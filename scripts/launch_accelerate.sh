#!/usr/bin/env bash
# Launch `mmtune train` on N processes with accelerate: DDP, or DeepSpeed ZeRO-2/3 through accelerate.
#   scripts/launch_accelerate.sh RECIPE NPROC [ddp|zero2|zero3] [key=value ...]
#   scripts/launch_accelerate.sh configs/tiny/llama_lora.yaml 2 zero2 train.max_steps=20
# Without a GPU the processes run on the CPU and talk over gloo. PYTHON overrides the interpreter.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,6p' "$0" >&2
  exit 2
fi
recipe=$1 nproc=$2
shift 2
mode=ddp
if [[ $# -gt 0 && $1 != *=* ]]; then mode=$1; shift; fi
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
has_gpu=$("$python" -c 'import torch; print(int(torch.cuda.is_available()))')
case $mode in
  ddp)
    config=configs/accelerate/ddp.yaml
    if [[ $has_gpu != 1 ]]; then export ACCELERATE_USE_CPU=1; fi ;;
  zero2|zero3)
    config=configs/accelerate/$mode.yaml
    unset ACCELERATE_USE_CPU  # it would make accelerate drop DeepSpeed
    ;;
  *) echo "launch_accelerate.sh: mode must be ddp, zero2 or zero3, got '$mode'" >&2; exit 2 ;;
esac
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$python" -m accelerate.commands.launch --config_file "$config" --num_processes "$nproc" \
  --main_process_port "$port" -m train.cli train --config "$recipe" "$@"
