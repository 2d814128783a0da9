#!/usr/bin/env bash
# Launch `mmtune train` with the `deepspeed` launcher on NPROC processes per node (ZeRO through accelerate).
#   scripts/launch_deepspeed.sh RECIPE NPROC [zero2|zero3|path/to/ds_config.json] [key=value ...]
#   scripts/launch_deepspeed.sh configs/tiny/llama_lora.yaml 2 zero3 train.max_steps=20
# Several nodes, either
#   - one launcher per node (SLURM, no ssh): NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as for torchrun;
#   - or DeepSpeed's own multi-node start from node 0 over ssh/pdsh: HOSTFILE=path (lines "host slots=N"),
#     MASTER_ADDR (node 0's address); add NODE_RANK to run per node with that hostfile instead.
# Paths are relative to the caller's folder. Without a GPU the processes run on the CPU over gloo.
# DeepSpeed builds its CPU communication op on first use (about 2 minutes, cached in TORCH_EXTENSIONS_DIR).
# PYTHON overrides the interpreter. TERM/INT/HUP stop the whole job (the launcher waits for its workers).
set -euo pipefail
DEFAULT_MODE=zero2
if [[ -n ${HOSTFILE:-} && -z ${NNODES:-} && -f $HOSTFILE ]]; then
  NNODES=$(grep -cEv '^[[:space:]]*(#|$)' "$HOSTFILE")  # one node per host line
fi
source "$(dirname "$0")/launch_common.sh"
case $mode in
  zero2|zero3) ds=$root/configs/deepspeed/$mode.json ;;
  *) ds=$(realpath -- "$mode" 2>/dev/null) && [[ -f $ds ]] || die "$mode: no such DeepSpeed config" ;;
esac
unset ACCELERATE_USE_CPU  # it would make accelerate drop DeepSpeed
nodes=(--num_gpus "$nproc" --master_addr "$master_addr" --master_port "$master_port")
if [[ -n ${HOSTFILE:-} ]]; then
  [[ -f $HOSTFILE ]] || die "HOSTFILE: $HOSTFILE: no such file"
  nodes=(--hostfile "$HOSTFILE" --master_addr "$master_addr" --master_port "$master_port")
  if [[ -n ${NODE_RANK:-} ]]; then nodes+=(--no_ssh --node_rank "$node_rank"); fi
elif [[ $nnodes -gt 1 ]]; then
  # DeepSpeed learns the layout from a hostfile only; its host names matter to ssh, not to --no_ssh.
  HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/mmtune-hostfile.XXXXXX")
  trap 'rm -f "$HOSTFILE"' EXIT
  for ((i = 0; i < nnodes; i++)); do echo "node$i slots=$nproc"; done >"$HOSTFILE"
  nodes=(--hostfile "$HOSTFILE" --master_addr "$master_addr" --master_port "$master_port" --no_ssh
         --node_rank "$node_rank")
fi
run_job "$python" -m deepspeed.launcher.runner "${nodes[@]}" --no_local_rank \
  --module train.cli train --config "$recipe" train.deepspeed="$ds" "${REST[@]}"
