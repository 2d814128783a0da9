# Sourced by launch_accelerate.sh and launch_deepspeed.sh (not run): the arguments and environment both share.
# Expects "$@" = RECIPE NPROC [MODE] [key=value ...] and DEFAULT_MODE. Sets root (the repository), recipe,
# nproc (processes per node), mode, python, REST (the key=value overrides) and the multi-node settings
# nnodes, node_rank, master_addr, master_port (from NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, the names
# torchrun and LLaMA-Factory use). It does not cd: the recipe, train.out_dir and the default runs/ are taken
# from the caller's folder, as a plain `mmtune train` would; the repository comes in through PYTHONPATH.
launcher=$(basename "$0")
die() { echo "$launcher: $*" >&2; exit 2; }
if [[ $# -lt 2 ]]; then
  awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" >&2  # the launcher's header comment
  exit 2
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
recipe=$1 nproc=$2
shift 2
mode=$DEFAULT_MODE
if [[ $# -gt 0 && $1 != *=* ]]; then mode=$1; shift; fi
REST=("$@")
[[ -f $recipe ]] || die "$recipe: no such recipe file (relative paths start in $PWD)"
positive='^[1-9][0-9]*$'
[[ $nproc =~ $positive ]] || die "NPROC: must be a positive number of processes per node, got '$nproc'"
nnodes=${NNODES:-1} node_rank=${NODE_RANK:-0} master_addr=${MASTER_ADDR:-127.0.0.1}
[[ $nnodes =~ $positive ]] || die "NNODES: must be a positive number of nodes, got '$nnodes'"
[[ $node_rank =~ ^[0-9]+$ && $node_rank -lt $nnodes ]] || die "NODE_RANK: must be 0..$((nnodes - 1)), got '$node_rank'"
python=${PYTHON:-$root/.venv/bin/python}
[[ -x $python ]] || python=python3
if [[ -n ${MASTER_PORT:-} ]]; then
  master_port=$MASTER_PORT
elif [[ $nnodes -gt 1 ]]; then
  master_port=29500  # torchrun's default: every node must name the same port
else
  master_port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
[[ $master_port =~ $positive ]] || die "MASTER_PORT: must be a port number, got '$master_port'"
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# Run "$@" in the background and wait for it; TERM, INT and HUP are passed on as TERM, which the launchers
# (torch elastic's agent, DeepSpeed's launch) answer by stopping their workers: those sit in sessions of
# their own, so a signal to this script's process group alone would never reach them. Exits with its status.
run_job() {
  "$@" &
  local job=$! status
  trap 'kill -TERM "$job" 2>/dev/null' TERM INT HUP
  while true; do
    status=0
    wait "$job" || status=$?  # (`|| ...`: set -e must not end the script here)
    # A trapped signal ends `wait` early (status > 128) while the job still runs: wait again.
    if [[ $status -gt 128 ]] && kill -0 "$job" 2>/dev/null; then continue; fi
    break
  done
  exit "$status"
}
