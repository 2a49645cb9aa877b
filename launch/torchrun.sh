#!/usr/bin/env bash
# Single-node launcher for braid: one torchrun agent, N worker processes.
#
#   launch/torchrun.sh [--nproc N] --config configs/x.yaml [section.key=value ...]
#   launch/torchrun.sh --nnodes 2 --node-rank R --rdzv-endpoint HEAD:PORT [--nproc N] --config ...
#       (run once per node; without --node-rank, c10d assigns node ranks)
#
# N comes from, in order: --nproc, $NPROC_PER_NODE, $CUDA_VISIBLE_DEVICES (its entry
# count), the GPUs `nvidia-smi -L` lists, else 1 (a CPU run).
#
# Before spawning anything it checks the config and its parallel layout once for the whole world
# (nnodes x nproc ranks; `braid.train --check-world-size`, no torch): a bad layout is one
# `braid: error:` line and exit 2, not one line per rank and torchrun's ChildFailedError dump.
# The ranks run under `braid.torchrun`, torch's torchrun with one change: a rank that still stops
# on bad input (data, checkpoints: what only a started rank can see) makes the launcher print that
# rank's line once and exit with its code (2; 3 for the non-finite stop) instead of torchrun's 1.
#
# Environment:
#   PYTHON          interpreter to run (default: the repository's .venv/bin/python when there
#                   is one, else python). We call `python -m braid.torchrun` instead of a
#                   `torchrun` binary so the interpreter you pick is the one that runs the workers.
#   BRAID_DRY_RUN=1 print the commands (the check, then the launch), shell-quoted one per line,
#                   and run nothing.
#
# Every argument other than --nproc is handed to `braid.train` unchanged and in order.
set -euo pipefail

# No dirname: the script must also run with a bare PATH (no coreutils).
script=${BASH_SOURCE[0]}
[[ $script == */* ]] && script_dir=${script%/*} || script_dir=.
repo=$(cd "$script_dir/.." && pwd)
# `make train` leaves the installed environment in .venv; a fresh shell has not activated it.
if [[ -z ${PYTHON:-} && -x $repo/.venv/bin/python ]]; then
    PYTHON=$repo/.venv/bin/python
fi
python=${PYTHON:-python}

die() {
    # One line on stderr and exit 2, so wrappers can tell usage errors from training failures.
    printf 'torchrun.sh: error: %s\n' "$*" >&2
    exit 2
}

# Print argv as one line that a POSIX shell (or Python's shlex.split) reads back verbatim.
# printf %q would do, but its $'...' and backslash forms are harder to read and to paste.
shell_quote() {
    local a out=()
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
            out+=("$a")
        else
            out+=("'${a//\'/\'\\\'\'}'")
        fi
    done
    local IFS=' '
    printf '%s\n' "${out[*]}"
}

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

gpu_count() {
    # CUDA_VISIBLE_DEVICES narrows what the workers can see, so it beats the hardware count.
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        local -a ids
        IFS=',' read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
        return
    fi
    local n=0 line
    if command -v nvidia-smi >/dev/null 2>&1; then
        # A broken driver makes nvidia-smi fail; that just means "no usable GPUs".
        while IFS= read -r line; do
            [[ $line == GPU\ * ]] && n=$((n + 1))
        done < <(nvidia-smi -L 2>/dev/null || true)
    fi
    echo "$n"
}

nproc=""
nnodes=1
node_rank=""
endpoint=""
have_config=0
train_args=()
while (($#)); do
    case $1 in
        --nproc)
            (($# >= 2)) || die "--nproc needs a value"
            nproc=$2
            shift 2
            continue
            ;;
        --nproc=*)
            nproc=${1#--nproc=}
            ;;
        --nnodes | --node-rank | --rdzv-endpoint)
            (($# >= 2)) || die "$1 needs a value"
            case $1 in
                --nnodes) nnodes=$2 ;;
                --node-rank) node_rank=$2 ;;
                --rdzv-endpoint) endpoint=$2 ;;
            esac
            shift 2
            continue
            ;;
        --config)
            (($# >= 2)) || die "--config needs a value"
            have_config=1
            train_args+=("$1" "$2")
            shift 2
            continue
            ;;
        --config=?*)
            have_config=1
            train_args+=("$1")
            ;;
        *)
            train_args+=("$1")
            ;;
    esac
    shift
done

((have_config)) || die "--config <file.yaml> is required (usage: launch/torchrun.sh [--nproc N] --config FILE [key=value ...])"

if [[ -z $nproc ]]; then
    if [[ -n ${NPROC_PER_NODE:-} ]]; then
        nproc=$NPROC_PER_NODE
    else
        nproc=$(gpu_count)
        ((nproc > 0)) || nproc=1
    fi
fi
is_count "$nproc" || die "process count must be a positive integer, got '$nproc'"

is_count "$nnodes" || die "--nnodes must be a positive integer, got '$nnodes'"
if ((nnodes == 1)); then
    topology=(--standalone --nnodes=1)
else
    # Several nodes: every launcher gets the same --nnodes and --rdzv-endpoint (the first node's
    # address and a free port). With --node-rank the ranks are fixed (static rendezvous on that
    # endpoint); without it c10d assigns them as launchers join.
    [[ $endpoint == ?*:[0-9]* ]] || die "--nnodes $nnodes needs --rdzv-endpoint HOST:PORT"
    if [[ -n $node_rank ]]; then
        [[ $node_rank =~ ^[0-9]+$ ]] && ((node_rank < nnodes)) || die "--node-rank must be in [0, $nnodes), got '$node_rank'"
        topology=(--nnodes="$nnodes" --node_rank="$node_rank" --master_addr="${endpoint%:*}" --master_port="${endpoint##*:}")
    else
        topology=(--nnodes="$nnodes" --rdzv_backend=c10d --rdzv_endpoint="$endpoint" --rdzv_id="${BRAID_RDZV_ID:-braid}")
    fi
fi

# Every launcher of a multi-node job checks the same world, so each stops before the rendezvous.
check=("$python" -m braid.train --check-world-size "$((nnodes * nproc))" "${train_args[@]}")
cmd=(
    "$python" -m braid.torchrun
    "${topology[@]}" --nproc_per_node="$nproc"
    -m braid.train "${train_args[@]}"
)

if [[ ${BRAID_DRY_RUN:-0} == 1 ]]; then
    shell_quote "${check[@]}"
    shell_quote "${cmd[@]}"
    exit 0
fi

# The check prints its own one line; pass its status on (2: bad input) without adding another.
rc=0
"${check[@]}" || rc=$?
((rc == 0)) || exit "$rc"

# exec so Ctrl-C and SIGTERM reach torchrun directly; it forwards them to the workers,
# which braid turns into "checkpoint at the next step boundary, then exit".
exec "${cmd[@]}"
