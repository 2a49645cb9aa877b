#!/usr/bin/env bash
# Stop the local two-node cluster that up.sh started: cancel its jobs, then end the daemons
# up.sh recorded in /run/braid-slurm-cluster/, by pid (SIGTERM, then SIGKILL after 10 s), and
# nothing else. Daemons that were already running when up.sh came (a system munged, say) stay.
# Safe to run twice. Installed packages, slurm.conf and the spool stay for the next up.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"
need_root

# Jobs first, while slurmctld can still end their steps; their processes would outlive slurmd.
if conf_is_ours && pid_alive "$(recorded_pid slurmctld || true)" slurmctld; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ' || true)
    if [[ -n ${jobs// /} ]]; then
        say "cancelling jobs: $jobs"
        # shellcheck disable=SC2086  # one job id per word
        scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do
            [[ -z $(squeue -h -o %i 2>/dev/null || true) ]] && break
            sleep 0.25
        done
    fi
fi

# stop_daemon KEY NAME: end the recorded pid if it still is NAME.
stop_daemon() {
    local key=$1 name=$2 pid
    pid=$(recorded_pid "$key" || true)
    if [[ -z $pid ]]; then
        return
    fi
    if pid_alive "$pid" "$name"; then
        say "stopping $key (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        local i
        for ((i = 0; i < 100; i++)); do
            pid_alive "$pid" "$name" || break
            sleep 0.1
        done
        if pid_alive "$pid" "$name"; then
            say "$key (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$STATE_DIR/$key.pid"
}

# Nodes before the controller, munge last: each needs the next one to shut down cleanly.
for node in "${NODES[@]}"; do stop_daemon "slurmd-$node" slurmd; done
stop_daemon slurmctld slurmctld
stop_daemon munged munged
say "cluster down"
