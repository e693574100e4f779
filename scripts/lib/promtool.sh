# Sourced by scripts/test.sh: installs promtool, which tests/service/test_prometheus_rules.py runs
# on deploy/prometheus/rules.yml (`promtool check rules`, `promtool test rules`). Debian ships it
# in the `prometheus` package, whose server must not start as a service here: a policy-rc.d
# answering 101 ("action forbidden") stops invoke-rc.d and deb-systemd-invoke from starting it,
# as scripts/lib/slurm.sh does for Slurm. A policy-rc.d already in place is left alone. Only the
# tests need promtool, so scripts/setup.sh does not install it.
ensure_promtool() {
  command -v promtool >/dev/null && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "test: promtool is not installed; the Prometheus rule tests need it:" \
         "sudo apt-get install -y --no-install-recommends prometheus (or promtool from a Prometheus release)" >&2
    return 0
  fi
  echo "==> installing promtool (Debian package prometheus; its service is not started)"
  ( # a subshell, so that its EXIT trap removes our policy-rc.d however the install ends
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\n# written by lathe scripts/test.sh while it installs promtool\nexit 101\n' > "$policy"
      chmod 755 "$policy"
      trap 'rm -f "$policy"' EXIT
    fi
    apt-cache show prometheus >/dev/null 2>&1 || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
  )
}
