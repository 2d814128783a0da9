#!/usr/bin/env bash
# Launch `mmtune train` with accelerate on NPROC processes per node: DDP, DeepSpeed ZeRO-2/3 or FSDP2.
#   scripts/launch_accelerate.sh RECIPE NPROC [ddp|zero2|zero3|fsdp2] [key=value ...]
#   scripts/launch_accelerate.sh configs/tiny/llama_lora.yaml 2 fsdp2 train.max_steps=20
# Several nodes: run it once on each node with the same NNODES, MASTER_ADDR (node 0's address) and
# MASTER_PORT (default 29500), and NODE_RANK=0..NNODES-1:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 scripts/launch_accelerate.sh RECIPE 8 zero3
# Paths are relative to the caller's folder. Without a GPU the processes run on the CPU over gloo.
# PYTHON overrides the interpreter. TERM/INT/HUP stop the whole job (the launcher waits for its workers).
set -euo pipefail
DEFAULT_MODE=ddp
source "$(dirname "$0")/launch_common.sh"
extra=()
case $mode in
  ddp)
    has_gpu=$("$python" -c 'import torch; print(int(torch.cuda.is_available()))')
    if [[ $has_gpu != 1 ]]; then export ACCELERATE_USE_CPU=1; fi ;;
  zero2|zero3)
    unset ACCELERATE_USE_CPU  # it would make accelerate drop DeepSpeed
    extra=(--deepspeed_multinode_launcher standard) ;;  # one launcher per node (SLURM, no ssh/pdsh)
  fsdp2)
    unset ACCELERATE_USE_CPU ;;  # mmtune turns FSDP on for CPU processes itself
  *) die "mode must be ddp, zero2, zero3 or fsdp2, got '$mode'" ;;
esac
run_job "$python" -m accelerate.commands.launch --config_file "$root/configs/accelerate/$mode.yaml" \
  --num_machines "$nnodes" --machine_rank "$node_rank" --num_processes "$((nproc * nnodes))" \
  --main_process_ip "$master_addr" --main_process_port "$master_port" "${extra[@]}" \
  -m train.cli train --config "$recipe" "${REST[@]}"
