#!/bin/sh
# The fraudflow image's entrypoint: one image, three modes.
#
#   jupyter [ARGS...]   JupyterLab on $JUPYTER_PORT (8888). Needs JUPYTER_TOKEN or
#                       JUPYTER_PASSWORD: it refuses to start an open server.
#   train ARGS...       a fraudflow command, e.g. `train train --data ... --out ...`, or
#                       torchrun: `train torchrun --nproc-per-node 4 -m fraudflow train ... --ddp`
#   serve [ARGS...]     the decision service: fraudflow serve on $FRAUDFLOW_HOST:$FRAUDFLOW_PORT
#                       (0.0.0.0:8000); --run from $FRAUDFLOW_RUN, --state from $FRAUDFLOW_STATE
#                       and --workers from $FRAUDFLOW_WORKERS when set (ARGS win over them)
#   healthcheck         the image's HEALTHCHECK: probes the mode this container was started in
#   anything else       run as given (e.g. `bash`)
#
# Exit status 64 (EX_USAGE) for a refused start.
set -eu

mode_file="${FRAUDFLOW_RUNTIME_DIR:-/tmp}/fraudflow-mode"

die() {
  echo "fraudflow-entrypoint: $*" >&2
  exit 64
}

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 64
}

# Remember the mode for `healthcheck` (best effort: /tmp may be missing or read-only).
record_mode() {
  printf '%s\n' "$1" >"$mode_file" 2>/dev/null || true
}

run_jupyter() {
  token="${JUPYTER_TOKEN:-}"
  password="${JUPYTER_PASSWORD:-}"
  if [ -z "$token" ] && [ -z "$password" ]; then
    die "jupyter needs JUPYTER_TOKEN or JUPYTER_PASSWORD set (non-empty); refusing to start" \
      "a JupyterLab that anyone who reaches port ${JUPYTER_PORT:-8888} could use"
  fi
  for arg in "$@"; do
    case "$arg" in
      *[Tt]oken=* | *[Pp]assword=* | *hashed_password=*)
        die "jupyter: pass credentials through JUPYTER_TOKEN or JUPYTER_PASSWORD, not" \
          "arguments (they would show in the process list), however got '${arg%%=*}=...'"
        ;;
    esac
  done
  record_mode jupyter
  set -- --ip=0.0.0.0 --port="${JUPYTER_PORT:-8888}" --no-browser \
    --ServerApp.root_dir="${JUPYTER_ROOT_DIR:-/workspace/notebooks}" "$@"
  if [ -n "$password" ]; then
    # Jupyter takes only a salted hash; the plain password never reaches its command line.
    hashed=$(python -c 'import os; from jupyter_server.auth import passwd
print(passwd(os.environ["JUPYTER_PASSWORD"]))')
    set -- "$@" --PasswordIdentityProvider.hashed_password="$hashed"
  fi
  # Jupyter Server reads JUPYTER_TOKEN from the environment itself.
  exec jupyter lab "$@"
}

run_train() {
  [ "$#" -gt 0 ] || die "train needs a fraudflow command, e.g. 'train train --data" \
    "/data/features --model mlp --out /runs/mlp --resume', or 'train torchrun ... -m" \
    "fraudflow train ... --ddp'"
  record_mode train
  case "$1" in
    torchrun)
      shift
      exec torchrun "$@"
      ;;
    fraudflow)
      shift
      exec fraudflow "$@"
      ;;
    *) exec fraudflow "$@" ;;
  esac
}

run_serve() {
  record_mode serve
  # The fixed options first: a repeated option takes its last value, so ARGS override them.
  set -- --host "${FRAUDFLOW_HOST:-0.0.0.0}" --port "${FRAUDFLOW_PORT:-8000}" "$@"
  if [ -n "${FRAUDFLOW_WORKERS:-}" ]; then set -- --workers "$FRAUDFLOW_WORKERS" "$@"; fi
  if [ -n "${FRAUDFLOW_STATE:-}" ]; then set -- --state "$FRAUDFLOW_STATE" "$@"; fi
  if [ -n "${FRAUDFLOW_RUN:-}" ]; then set -- --run "$FRAUDFLOW_RUN" "$@"; fi
  exec fraudflow serve "$@"
}

http_ok() {
  exec python -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=4)' "$1"
}

run_healthcheck() {
  mode=$(cat "$mode_file" 2>/dev/null || echo unknown)
  case "$mode" in
    serve) http_ok "http://127.0.0.1:${FRAUDFLOW_PORT:-8000}/healthz" ;;
    jupyter) http_ok "http://127.0.0.1:${JUPYTER_PORT:-8888}/api" ;;
    *) exit 0 ;; # train, or a command of the user's: running is all there is to check
  esac
}

[ "$#" -gt 0 ] || usage
mode="$1"
shift
case "$mode" in
  jupyter) run_jupyter "$@" ;;
  train) run_train "$@" ;;
  serve) run_serve "$@" ;;
  healthcheck) run_healthcheck ;;
  -h | --help | help) usage ;;
  *) exec "$mode" "$@" ;;
esac
