#!/usr/bin/env bash
# Start a two-node Slurm cluster on this one machine, for tests and for trying the slurm launcher:
# munged, slurmctld, and two slurmd daemons (`slurmd -N n1`, `slurmd -N n2`) that Slurm sees as
# nodes n1 and n2, both at 127.0.0.1. Run as root after install.sh; stop it with down.sh.
#
# Idempotent: a daemon that already runs is left alone, and the script returns once `sinfo`
# shows both nodes idle (or fails after BRAID_SLURM_WAIT seconds, default 60, with the logs'
# tails). Files: /etc/slurm/slurm.conf, /var/spool/slurm{ctld,d-n1,d-n2}, /var/log/slurm/.
#
# Node size: BRAID_SLURM_CPUS (default 1) CPUs per node. Jobs run as the submitting user, with no
# CPU binding or cgroups (task/none, proctrack/linuxproc), so the workers of both "nodes"
# share the machine's real cores.
set -euo pipefail
source "$(dirname "$0")/common.sh"
need_root

for tool in munged munge unmunge slurmctld slurmd sinfo scontrol; do
    command -v "$tool" >/dev/null ||
        die "$tool not found: install Slurm and munge first with launch/slurm_cluster/install.sh"
done
cpus=${BRAID_SLURM_CPUS:-1}
[[ $cpus =~ ^[1-9][0-9]*$ ]] || die "BRAID_SLURM_CPUS must be a positive integer, got '$cpus'"
wait_s=${BRAID_SLURM_WAIT:-60}
[[ $wait_s =~ ^[1-9][0-9]*$ ]] || die "BRAID_SLURM_WAIT must be a positive integer, got '$wait_s'"

mkdir -p "$STATE_DIR"

# --------------------------------------------------------------------------------- munge
# Slurm signs every message with munge; both sides need the same key and a running munged.
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 700 /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
# munged refuses a key that others can read or that it does not own.
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge /var/lib/munge /var/log/munge

if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running"
else
    say "starting munged"
    # runuser, not su: no PAM session or login shell needed for a daemon.
    runuser -u munge -- munged
    pid=$(cat /run/munge/munged.pid)
    pid_alive "$pid" munged || die "munged did not start; see /var/log/munge/munged.log"
    echo "$pid" >"$STATE_DIR/munged.pid"
fi

# ------------------------------------------------------------------------------ slurm.conf
host=$(hostname -s)
conf=$(
    cat <<CONF
$CONF_MARKER
ClusterName=braid-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# A requeued job waits out the job credential's lifetime (default 120 s) before it may start
# again; locally a launch takes well under a second, so 10 s keeps requeue tests short.
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
# %n = the node name: two slurmd on one host need their own pid file, spool and log.
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
# No cgroups in containers and CI runners: track job processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Jobs start on events (submit, job end); a requeued job becomes eligible later without one,
# so it waits for the periodic pass (default every 60 s): run that pass every 2 s.
SchedulerParameters=sched_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# A node that went down (daemon restarted, machine rebooted) comes back by itself.
ReturnToService=2
# Short timeouts: everything is local, and a test waits on every one of them.
SlurmdTimeout=30
KillWait=10
MinJobAge=60
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
)
if [[ -e $SLURM_CONF_FILE ]] && ! conf_is_ours; then
    die "$SLURM_CONF_FILE exists and was not written by this script (no '$CONF_MARKER' line); move it away to use the local cluster"
fi
if [[ ! -e $SLURM_CONF_FILE ]] || [[ $(<"$SLURM_CONF_FILE") != "$conf" ]]; then
    # Daemons read slurm.conf once; a new one under running daemons would be half applied.
    for pidfile in /run/slurmctld.pid /run/slurmd-n1.pid /run/slurmd-n2.pid; do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        pid_alive "$pid" "$(basename "$pidfile" .pid | cut -d- -f1)" &&
            die "the cluster runs with another slurm.conf (pid $pid): stop it with launch/slurm_cluster/down.sh, then rerun up.sh"
    done
    say "writing $SLURM_CONF_FILE"
    mkdir -p "$(dirname "$SLURM_CONF_FILE")"
    printf '%s\n' "$conf" >"$SLURM_CONF_FILE"
fi
mkdir -p /var/spool/slurmctld /var/log/slurm
for node in "${NODES[@]}"; do mkdir -p "/var/spool/slurmd-$node"; done

# ------------------------------------------------------------------------------- daemons
# start_daemon KEY NAME PIDFILE CMD...: start CMD (which daemonizes and writes PIDFILE) unless
# the pid in PIDFILE is already a live NAME, and record the pid for down.sh.
start_daemon() {
    local key=$1 name=$2 pidfile=$3
    shift 3
    local pid=""
    [[ -r $pidfile ]] && pid=$(<"$pidfile")
    if pid_alive "$pid" "$name"; then
        say "$key already running (pid $pid)"
        return
    fi
    say "starting $key"
    rm -f "$pidfile"
    "$@"
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -s $pidfile ]] && pid=$(<"$pidfile") && pid_alive "$pid" "$name" && break
        sleep 0.1
    done
    pid_alive "$pid" "$name" || die "$key did not start; see the tail of its log in /var/log/slurm/"
    echo "$pid" >"$STATE_DIR/$key.pid"
}

start_daemon slurmctld slurmctld /run/slurmctld.pid slurmctld
for node in "${NODES[@]}"; do
    start_daemon "slurmd-$node" slurmd "/run/slurmd-$node.pid" slurmd -N "$node"
done

# ---------------------------------------------------------------------------------- ready
deadline=$((SECONDS + wait_s))
while :; do
    states=$(sinfo -h -N -p local -o '%N %t' 2>/dev/null | sort -u || true)
    idle=$(grep -cE '^n[12] (idle|mix|alloc)$' <<<"$states" || true)
    ((idle == 2)) && break
    if ((SECONDS >= deadline)); then
        echo "sinfo: ${states:-<no answer>}" >&2
        tail -n 5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-n*.log >&2 || true
        die "the two nodes did not become ready within ${wait_s}s"
    fi
    # A node marked down by an earlier run of the cluster needs an explicit resume.
    if grep -qE ' (down|drain|drng|fail)' <<<"$states"; then
        scontrol update nodename=n[1-2] state=resume 2>/dev/null || true
    fi
    sleep 0.5
done
say "cluster up: $(sinfo -h -N -p local -o '%N=%t' | sort -u | tr '\n' ' ')"
