#!/usr/bin/env bash
# Install HAProxy from the distribution's packages (Debian/Ubuntu), for `slimrank front
# --in-flight` and its tests. Needs root; CI runs it as root before the tests. Debian 12's
# haproxy (2.6) proxies gRPC over HTTP/2 on both sides. curl comes too: the front's tests
# read its refusal on the wire with it.
#
# The package also enables a haproxy service with its own config; the front runs its own
# HAProxy on a port of its own, so the packaged service is stopped when systemd runs.
set -euo pipefail

if { command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ]; } && command -v curl >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_haproxy.sh: must run as root (sudo $0)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends haproxy curl >/dev/null
if [ -d /run/systemd/system ]; then
    systemctl disable --now haproxy >/dev/null 2>&1 || true
fi
/usr/sbin/haproxy -v | head -n 1
