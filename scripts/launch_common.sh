# Sourced by launch_accelerate.sh and launch_deepspeed.sh (not run): the arguments and environment both share.
# Expects "$@" = RECIPE NPROC [MODE] [key=value ...] and DEFAULT_MODE; sets recipe, nproc, mode, python,
# port and REST (the key=value overrides), and cds to the repository root.
if [[ $# -lt 2 ]]; then
  awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" >&2  # the launcher's header comment
  exit 2
fi
recipe=$1 nproc=$2
shift 2
mode=$DEFAULT_MODE
if [[ $# -gt 0 && $1 != *=* ]]; then mode=$1; shift; fi
REST=("$@")
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
