#!/usr/bin/env bash
# Install nginx from the distribution's packages (Debian/Ubuntu), for `slimrank front` and its
# tests. Needs root; CI runs it as root before the tests. The front needs nginx's HTTP/2 and
# gRPC proxy modules, which Debian's `nginx` has built in; `nginx-light` (in Debian 12 a small
# package that pulls `nginx` and one module) is asked for where it exists, `nginx` otherwise.
#
# The package also enables an nginx service on :80; the front runs its own nginx on a port
# of its own, so the packaged service is stopped when systemd runs.
set -euo pipefail

if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_nginx.sh: must run as root (sudo $0)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if apt-cache show nginx-light >/dev/null 2>&1; then
    package=nginx-light
else
    package=nginx
fi
apt-get install -y -qq --no-install-recommends "$package" >/dev/null
if [ -d /run/systemd/system ]; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
fi
/usr/sbin/nginx -v
