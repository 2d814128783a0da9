#!/usr/bin/env bash
# Launch `mmtune train` on N processes with the `deepspeed` launcher (ZeRO through accelerate).
#   scripts/launch_deepspeed.sh RECIPE NPROC [zero2|zero3|path/to/ds_config.json] [key=value ...]
#   scripts/launch_deepspeed.sh configs/tiny/llama_lora.yaml 2 zero3 train.max_steps=20
# Without a GPU the processes run on the CPU and talk over gloo. PYTHON overrides the interpreter.
# DeepSpeed builds its CPU communication op on first use (about 2 minutes, cached in TORCH_EXTENSIONS_DIR).
set -euo pipefail
DEFAULT_MODE=zero2
source "$(dirname "$0")/launch_common.sh"
ds=$mode
case $ds in
  zero2|zero3) ds=configs/deepspeed/$ds.json ;;
esac
[[ -f $ds ]] || { echo "launch_deepspeed.sh: no DeepSpeed config '$ds'" >&2; exit 2; }
unset ACCELERATE_USE_CPU  # it would make accelerate drop DeepSpeed
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$python" -m deepspeed.launcher.runner --num_gpus "$nproc" --master_port "$port" --no_local_rank \
  --module train.cli train --config "$recipe" train.deepspeed="$ds" "${REST[@]}"
