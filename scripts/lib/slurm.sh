# Sourced by scripts/setup.sh: installs the Slurm packages that tests/service/slurm_cluster.py
# runs a private cluster from (Debian/Ubuntu: slurmctld, slurmd, slurm-client, munge). The tests
# start their own munged, slurmctld and slurmd under a temp dir, so the packages' system
# services must not be started by the install: a policy-rc.d answering 101 ("action forbidden")
# stops invoke-rc.d and deb-systemd-invoke from starting them. A policy-rc.d already in place
# (Docker images ship one) is left alone.
SLURM_PACKAGES="slurmctld slurmd slurm-client munge"

ensure_slurm_packages() {
  local PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in /usr/sbin, off a user's PATH
  if command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; then
    return 0
  fi >/dev/null
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup: Slurm is not installed; the Slurm tests need it:" \
         "sudo apt-get install -y --no-install-recommends $SLURM_PACKAGES" >&2
    return 0
  fi
  ( # a subshell, so that its EXIT trap removes our policy-rc.d however the install ends
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\n# written by lathe scripts/setup.sh while it installs Slurm\nexit 101\n' > "$policy"
      chmod 755 "$policy"
      trap 'rm -f "$policy"' EXIT
    fi
    # shellcheck disable=SC2086
    apt-cache show $SLURM_PACKAGES >/dev/null 2>&1 || apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $SLURM_PACKAGES
  )
}
