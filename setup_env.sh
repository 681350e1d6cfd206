#!/usr/bin/env bash
# Build the environments. Idempotent: a second run installs nothing unless a requirements file
# changed.
#
#   bash setup_env.sh            main env (.venv) + worker env; test browser when root with apt
#   bash setup_env.sh --pack     also conda-pack the worker env into dist/ (needs conda)
#   bash setup_env.sh --ray      also install ray (the pin in requirements.txt) into the worker env,
#                                so it can host Ray actors (runtime_env py_executable / conda)
#   bash setup_env.sh --ray --pack   the packed env for a Ray cluster's nodes
#   bash setup_env.sh --no-worker   skip the worker env
#   PYTHON=python3.11 bash setup_env.sh   build the venvs with that Python (default python3; 3.11 or newer)
#
# Main env: .venv (a venv), for main.py, the tests and the HTTP service, with this project installed
#   editable (pyproject.toml): `from src.models.reward import ...` from any folder, and `qwen-judge`;
#   plus verl and OpenRLHF without their dependencies (requirements-rl.txt,
#   requirements-rl-compat.txt) for the RL tests, and bitsandbytes in .venv/quant for the
#   quantization tests (requirements-quant.txt).
# Worker env: only torch, torchvision, transformers, qwen-vl-utils, pillow (requirements-worker.txt).
#   With conda on PATH it is the conda env `reward-worker` (launcher: {conda: reward-worker}),
#   which --pack ships to other machines; without conda it is the venv .venv-worker
#   (launcher: .venv-worker/bin/python).
# torch and torchvision come as a matched pair from the package index; the CUDA build also runs
# on machines without a GPU.
# `sh setup_env.sh` (dash on Debian and Ubuntu) stopped at once on `set -o pipefail`: run it with bash.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
CALLER_PWD=$PWD
cd "$(dirname "$0")"

PYTHON_GIVEN=${PYTHON:+1}  # set by the caller: venvs of another Python are rebuilt with it
PYTHON=${PYTHON:-python3}
WORKER_ENV_NAME=${WORKER_ENV_NAME:-reward-worker}
PACK=0
WORKER=1
RAY=0
for arg in "$@"; do
  case "$arg" in
    --pack) PACK=1 ;;
    --no-worker) WORKER=0 ;;
    --ray) RAY=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "setup_env.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

say() { echo "[setup_env] $*"; }

# --pack packs the conda worker env: without conda, say so before building anything.
if [ "$PACK" = 1 ] && { [ "$WORKER" = 0 ] || ! command -v conda >/dev/null 2>&1; }; then
  echo "setup_env.sh --pack: conda-pack needs conda (install Miniforge) and the worker env (no --no-worker), or rebuild the worker env on the target machine with this script" >&2
  exit 2
fi

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# py_version PY [MODULE]: "3.11" when PY runs (and imports MODULE), else nothing and status 1.
py_version() { "$1" -c "import sys${2:+, $2}; print('%d.%d' % sys.version_info[:2])" 2>/dev/null; }
# The pins need Python 3.11 or newer (numpy, pillow, transformers).
new_enough() { [ "$(printf '%s\n' 3.11 "$1" | sort -V | head -n1)" = 3.11 ]; }

# make_venv DIR: a venv in DIR. One an earlier run left behind is reused when its python runs, has
# pip and is 3.11 or newer (and, when the caller set PYTHON, is that Python's version); otherwise it is
# built again with $PYTHON from scratch, its stamps with it, so everything is installed again: a run
# interrupted while the venv was made leaves a python without pip, on which every later pip call
# failed, and a venv of another Python would be called "up to date" by its stamps.
make_venv() {
  local dir=$1 have want why=""
  if [ -e "$dir" ] || [ -L "$dir" ]; then
    if ! have=$(py_version "$dir/bin/python" pip); then
      if py_version "$dir/bin/python" >/dev/null; then why="it has no pip (an interrupted run?)"; else why="its python does not run"; fi
    elif ! new_enough "$have" || { [ -n "$PYTHON_GIVEN" ] && [ "$have" != "$(py_version "$PYTHON")" ]; }; then
      why="it is Python $have"
    else
      return 0
    fi
  fi
  # Checked before anything is built, instead of pip's "No matching distribution found for pillow==..."
  # in a venv that later runs would reuse.
  if ! want=$(py_version "$PYTHON"); then
    echo "setup_env.sh: cannot run '$PYTHON': install Python 3.11 (or newer) and run PYTHON=python3.11 bash setup_env.sh" >&2
    exit 2
  fi
  if ! new_enough "$want"; then
    echo "setup_env.sh: '$PYTHON' is Python $want; the environments need Python 3.11 or newer." >&2
    echo "  Install it and run: PYTHON=python3.11 bash setup_env.sh" >&2
    exit 2
  fi
  if [ -n "$why" ]; then
    say "rebuilding $dir with Python $want ($PYTHON): $why"
    "$PYTHON" -m venv --clear "$dir"
  else
    say "creating $dir with Python $want ($PYTHON)"
    "$PYTHON" -m venv "$dir"
  fi
}

# pip_sync PYTHON_BIN STAMP_FILE REQ_FILE...: install when the requirements changed since last time.
pip_sync() {
  local py=$1 stamp=$2; shift 2
  local want; want=$(hash_of "$@")
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "$(dirname "$(dirname "$py")") is up to date"
    return
  fi
  # pip is quiet: say what the next minutes are, or a first run looks hung (and gets interrupted)
  say "installing $1 into $(dirname "$(dirname "$py")") (the first time: minutes; torch's CUDA build is several GB)"
  "$py" -m pip install --quiet --upgrade pip
  "$py" -m pip install --quiet -r "$1"
  echo "$want" > "$stamp"
}

# need_disk GB WHAT: stop before pip does, with the reason, when this folder's disk has less than GB
# free. An environment holds torch's CUDA build (.venv ~5.8 GB, .venv-worker ~5.0 GB, by du), and a
# disk that fills halfway through pip leaves a broken environment behind.
need_disk() {
  local want_gb=$1 what=$2 free_kb
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((want_gb * 1024 * 1024)) ]; then
    echo "setup_env.sh: $what needs about $want_gb GB of free disk; $(df -Ph . | awk 'NR==2 {print $4}') is free in $PWD." >&2
    echo "  Free some space (or run from a folder on a larger disk) and run setup_env.sh again;" >&2
    echo "  --no-worker skips the worker environment (about 5 GB)." >&2
    exit 1
  fi
}

# --- main environment ------------------------------------------------------------------------
if [ ! -f .venv/.requirements.sha256 ]; then
  need_disk 7 "the main environment (.venv: torch, transformers, the RL frameworks)"
fi
make_venv .venv
pip_sync .venv/bin/python .venv/.requirements.sha256 requirements.txt requirements-worker.txt
# This project, editable, so `from src.models.reward import ...` works from any folder and the
# `qwen-judge` command exists. Its dependencies are the pinned requirements above (--no-deps).
# Skipped when this checkout is already installed with this pyproject.toml.
want_install=$(echo "$PWD" | cat - pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/qwen-judge ] || [ "$(cat .venv/.install.sha256 2>/dev/null)" != "$want_install" ]; then
  say "installing this project into .venv (editable)"
  .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .  # setuptools: requirements.txt
  echo "$want_install" > .venv/.install.sha256
fi

# RL frameworks for the hooks' tests (requirements-rl.txt): without their dependencies, which are
# listed there, so torch and transformers stay as pinned above. The older releases
# (requirements-rl-compat.txt) each go into their own folder under .venv/rl-compat.
rl_want=$(hash_of requirements-rl.txt requirements-rl-compat.txt)
if [ -f .venv/.requirements-rl.sha256 ] && [ "$(cat .venv/.requirements-rl.sha256)" = "$rl_want" ]; then
  say "RL frameworks are up to date"
else
  .venv/bin/python -m pip install --quiet --no-deps -r requirements-rl.txt
  rm -rf .venv/rl-compat
  grep -Ev '^\s*(#|$)' requirements-rl-compat.txt | while read -r pin; do
    .venv/bin/python -m pip install --quiet --no-deps --target ".venv/rl-compat/${pin/==/-}" "$pin"
  done
  echo "$rl_want" > .venv/.requirements-rl.sha256
fi

# bitsandbytes for the quantization tests, in its own folder (requirements-quant.txt says why).
q_want=$(hash_of requirements-quant.txt)
if [ -f .venv/.requirements-quant.sha256 ] && [ "$(cat .venv/.requirements-quant.sha256)" = "$q_want" ]; then
  say "bitsandbytes (tests) is up to date"
else
  rm -rf .venv/quant
  .venv/bin/python -m pip install --quiet --no-deps --target .venv/quant -r requirements-quant.txt
  echo "$q_want" > .venv/.requirements-quant.sha256
fi

# --- worker environment ----------------------------------------------------------------------
if [ "$WORKER" = 1 ]; then
  if command -v conda >/dev/null 2>&1; then
    if ! conda env list | awk '{print $1}' | grep -qx "$WORKER_ENV_NAME"; then
      say "creating conda env $WORKER_ENV_NAME"
      conda create -y -q -n "$WORKER_ENV_NAME" python=3.11 pip
    fi
    wpy=$(conda run -n "$WORKER_ENV_NAME" python -c 'import sys; print(sys.executable)')
    pip_sync "$wpy" "$(dirname "$(dirname "$wpy")")/.requirements.sha256" requirements-worker.txt
  else
    if [ ! -f .venv-worker/.requirements.sha256 ]; then
      need_disk 6 "the worker environment (.venv-worker: torch, torchvision, transformers)"
    fi
    make_venv .venv-worker  # no conda on PATH
    pip_sync .venv-worker/bin/python .venv-worker/.requirements.sha256 requirements-worker.txt
    wpy=.venv-worker/bin/python
  fi
  if [ "$RAY" = 1 ]; then
    # Ray actors run in the worker env, and Ray needs the same version on the driver and the workers.
    ray_pin=$(grep -E '^ray==' requirements.txt)
    say "installing $ray_pin into the worker env"
    "$wpy" -m pip install --quiet "$ray_pin"
  fi
fi

# --- test browser for the HTML report tests (Debian's chromium), best effort -------------------
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  say "installing chromium for the report tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || say "could not install chromium; the browser test of the report will be skipped"
fi

# --- ship the worker env -----------------------------------------------------------------------
if [ "$PACK" = 1 ]; then  # conda and the worker env were checked before anything was built
  conda run -n "$WORKER_ENV_NAME" python -m pip install --quiet conda-pack
  mkdir -p dist
  conda run -n "$WORKER_ENV_NAME" conda-pack -n "$WORKER_ENV_NAME" -o "dist/$WORKER_ENV_NAME.tar.gz" --force
  say "packed dist/$WORKER_ENV_NAME.tar.gz: unpack with 'mkdir env && tar -xzf $WORKER_ENV_NAME.tar.gz -C env && env/bin/conda-unpack'"
  [ "$RAY" = 1 ] || say "this pack has no ray: for Ray actors, build it with --ray --pack"
fi
# The next command as the caller can paste it: from the folder they ran this script from.
here=""; [ "$CALLER_PWD" = "$PWD" ] || here="cd $(printf '%q' "$PWD") && "
say "ready: ${here}.venv/bin/python main.py --config configs/demo.yaml   (or${here:+, from there}: .venv/bin/qwen-judge run --config configs/demo.yaml)"
