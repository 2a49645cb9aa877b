# Shared by up.sh and down.sh (sourced, not run): where the local two-node cluster keeps its
# files, and small helpers. Everything lives at Slurm's and munge's default paths, so plain
# `sbatch`, `sinfo` and `srun` find the cluster without SLURM_CONF.

SLURM_CONF_FILE=/etc/slurm/slurm.conf
# The first line of the slurm.conf we write. A slurm.conf without it belongs to someone else
# (a real cluster's client config): up.sh refuses to overwrite it, down.sh to touch its daemons.
CONF_MARKER="# braid local two-node cluster (launch/slurm_cluster/up.sh)"
# The pids of the daemons up.sh started, one file per daemon: down.sh ends exactly these.
STATE_DIR=/run/braid-slurm-cluster
NODES=(n1 n2)

die() {
    printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
    exit 2
}

say() { printf '%s: %s\n' "$(basename "$0")" "$*"; }

need_root() {
    [[ $(id -u) == 0 ]] || die "must run as root (it writes /etc/slurm and starts system daemons); try: sudo $0"
}

# pid_alive PID NAME: PID runs and is the program NAME (guards against a recycled pid).
pid_alive() {
    [[ $1 =~ ^[0-9]+$ ]] && [[ -r /proc/$1/comm ]] || return 1
    local comm
    comm=$(<"/proc/$1/comm") || return 1
    # Debian installs the daemons as slurmctld-wlm / slurmd-wlm behind alternatives symlinks.
    [[ $comm == "$2" || $comm == "$2-wlm" ]]
}

# recorded_pid KEY: the pid up.sh recorded for daemon KEY (munged, slurmctld, slurmd-n1 ...).
recorded_pid() {
    local f=$STATE_DIR/$1.pid
    [[ -r $f ]] && printf '%s\n' "$(<"$f")"
}

conf_is_ours() {
    [[ -r $SLURM_CONF_FILE ]] && [[ $(head -n 1 "$SLURM_CONF_FILE") == "$CONF_MARKER" ]]
}
