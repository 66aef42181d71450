#!/usr/bin/env bash
# Create what the secure deploy defaults need, under deploy/secrets (or DIR):
#
#   deploy/make_secrets.sh [DIR] [SERVER_NAMES]
#
# tls/: a CA, the server's certificate (SERVER_NAMES, an openssl subjectAltName list, default
# localhost, 127.0.0.1 and the Kubernetes service names), a client certificate for the health
# probe and one for a frontend; admin/token: a random Admin bearer token;
# grafana-admin-password: a random password. Files are readable by their owner only; run as
# root, they are given to the users the images run as (slimrank 10001, grafana 472).
# Kubernetes: load them with the `kubectl create secret` lines in deploy/README.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here/secrets}
names=${2:-DNS:localhost,IP:127.0.0.1,DNS:slimrank,DNS:slimrank.slimrank.svc,DNS:slimrank.slimrank.svc.cluster.local}
umask 077
mkdir -p "$dir/tls" "$dir/admin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$here/../scripts/gen_certs.sh" "$work" "$names" >/dev/null
cp "$work/server.pem" "$dir/tls/tls.crt"
cp "$work/server.key" "$dir/tls/tls.key"
cp "$work/ca.pem" "$dir/tls/ca.crt"
cp "$work/client.pem" "$dir/tls/client.crt"
cp "$work/client.key" "$dir/tls/client.key"
cp "$work/client.pem" "$dir/tls/probe.crt"
cp "$work/client.key" "$dir/tls/probe.key"
openssl rand -hex 32 >"$dir/admin/token"
openssl rand -base64 24 >"$dir/grafana-admin-password"
chmod 600 "$dir"/tls/* "$dir/admin/token" "$dir/grafana-admin-password"
if [ "$(id -u)" -eq 0 ]; then
    chown -R 10001:10001 "$dir/tls" "$dir/admin"
    chown 472 "$dir/grafana-admin-password"  # the grafana image's user
fi
echo "wrote $dir/{tls,admin,grafana-admin-password}"
