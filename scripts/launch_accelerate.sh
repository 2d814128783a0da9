#!/usr/bin/env bash
# Launch `mmtune train` on N processes with accelerate: DDP, or DeepSpeed ZeRO-2/3 through accelerate.
#   scripts/launch_accelerate.sh RECIPE NPROC [ddp|zero2|zero3] [key=value ...]
#   scripts/launch_accelerate.sh configs/tiny/llama_lora.yaml 2 zero2 train.max_steps=20
# Without a GPU the processes run on the CPU and talk over gloo. PYTHON overrides the interpreter.
set -euo pipefail
DEFAULT_MODE=ddp
source "$(dirname "$0")/launch_common.sh"
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
exec "$python" -m accelerate.commands.launch --config_file "$config" --num_processes "$nproc" \
  --main_process_port "$port" -m train.cli train --config "$recipe" "${REST[@]}"
