#!/usr/bin/env bash
# nuwa-train launcher: sets up .venv on first use, then runs a command.
#
#   ./launch.sh demo               the main job (today: the prefill benchmark, `nuwa-train bench`)
#   ./launch.sh test [PYTEST...]   the test suite
#   ./launch.sh COMMAND [ARGS...]  any `nuwa-train` command, e.g. `./launch.sh bench --shapes tiny`
#
# Set-up: uses the active virtualenv if there is one, else creates ./.venv. torch==2.13.0 (a CPU
# build) is installed only when no torch is importable, so an existing CUDA torch is never replaced;
# the project is (re)installed whenever pyproject.toml changes.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$root"

log() { printf '[launch.sh] %s\n' "$*" >&2; }

ensure_environment() {
    if [ -z "${VIRTUAL_ENV:-}" ]; then
        if [ ! -x .venv/bin/python ]; then
            log "creating .venv"
            python3 -m venv .venv
        fi
        # shellcheck disable=SC1091
        source .venv/bin/activate
    fi
    if ! python -c "import torch" >/dev/null 2>&1; then
        log "installing torch==2.13.0 (CPU build)"
        python -m pip install --quiet torch==2.13.0
    fi
    local stamp="$VIRTUAL_ENV/.nuwa-train-installed" digest
    digest=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
        log "installing nuwa-train and its dependencies (editable, with the dev extra)"
        python -m pip install --quiet -e ".[dev]"
        echo "$digest" > "$stamp"
    fi
}

command=${1:-}
if [ -z "$command" ] || [ "$command" = "-h" ] || [ "$command" = "--help" ]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
shift

ensure_environment
case "$command" in
    demo)
        log "running the main job: nuwa-train bench $*"
        exec nuwa-train bench "$@"
        ;;
    test)
        log "running: python -m pytest $*"
        exec python -m pytest "$@"
        ;;
    *)
        exec nuwa-train "$command" "$@"
        ;;
esac
