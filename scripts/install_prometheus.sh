#!/usr/bin/env bash
# Install Prometheus and promtool from the distribution's packages (Debian/Ubuntu), for the
# tests that check and run deploy/prometheus. Needs root; CI runs it with sudo before the tests.
#
# The Debian package also enables a prometheus service on :9090; the tests start their own
# Prometheus on a free loopback port, so the packaged service is stopped when systemd runs.
set -euo pipefail

if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_prometheus.sh: must run as root (sudo $0)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
if [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
promtool --version | head -n 1
