#!/usr/bin/env bash
# Install what the local two-node Slurm cluster needs (Debian/Ubuntu, as root):
#   slurmctld slurmd slurm-client munge   (Slurm 22.05 on Debian 12)
# Does nothing when they are already installed, so CI and developers can always call it.
# Then: launch/slurm_cluster/up.sh starts the cluster, down.sh stops it.
set -euo pipefail
source "$(dirname "$0")/common.sh"
need_root

packages=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
    say "already installed: ${packages[*]}"
    exit 0
fi
command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} with this system's package manager"
say "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# --no-install-recommends: the recommends pull in mail and X libraries nothing here uses.
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
say "installed: $(slurmctld -V)"
