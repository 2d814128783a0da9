#!/usr/bin/env bash
# Launch `mmtune train` on N processes with the `deepspeed` launcher (ZeRO through accelerate).
#   scripts/launch_deepspeed.sh RECIPE NPROC [zero2|zero3|path/to/ds_config.json] [key=value ...]
#   scripts/launch_deepspeed.sh configs/tiny/llama_lora.yaml 2 zero3 train.max_steps=20
# Without a GPU the processes run on the CPU and talk over gloo. PYTHON overrides the interpreter.
# DeepSpeed builds its CPU communication op on first use (about 2 minutes, cached in TORCH_EXTENSIONS_DIR).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,7p' "$0" >&2
  exit 2
fi
recipe=$1 nproc=$2
shift 2
ds=zero2
if [[ $# -gt 0 && $1 != *=* ]]; then ds=$1; shift; fi
cd "$(dirname "$0")/.."
case $ds in
  zero2|zero3) ds=configs/deepspeed/$ds.json ;;
esac
[[ -f $ds ]] || { echo "launch_deepspeed.sh: no DeepSpeed config '$ds'" >&2; exit 2; }
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
unset ACCELERATE_USE_CPU  # it would make accelerate drop DeepSpeed
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$python" -m deepspeed.launcher.runner --num_gpus "$nproc" --master_port "$port" --no_local_rank \
  --module train.cli train --config "$recipe" train.deepspeed="$ds" "$@"
