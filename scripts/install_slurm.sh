#!/usr/bin/env bash
# Idempotent install of a single-host SLURM (Debian slurm-wlm) for the loopback test cluster
# (tests/slurm_cluster.py) and CI. A no-op when slurmctld, slurmd, sbatch and munged are already there.
# Needs root (or passwordless sudo) and apt; exits 1 with a message otherwise.
set -euo pipefail
need=(slurmctld slurmd sbatch squeue scontrol scancel munged)
missing=0
for b in "${need[@]}"; do command -v "$b" >/dev/null 2>&1 || missing=1; done
[ "$missing" = 0 ] && exit 0
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install_slurm.sh: not root and no passwordless sudo; install slurmctld slurmd slurm-client munge yourself" >&2
    exit 1
  fi
fi
command -v apt-get >/dev/null 2>&1 || { echo "install_slurm.sh: apt-get not available" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
pkgs=(slurmctld slurmd slurm-client munge)
if ! $SUDO apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1; then
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
fi
for b in "${need[@]}"; do command -v "$b" >/dev/null 2>&1 || { echo "install_slurm.sh: $b still missing" >&2; exit 1; }; done
echo "slurm installed: $(slurmctld -V 2>/dev/null || true)"
