#!/usr/bin/env bash
# Throwaway certificates for TLS and mutual TLS: a CA, a server cert and a client cert.
#
#   scripts/gen_certs.sh DIR [SERVER_NAMES]
#
# Writes DIR/{ca,server,client}.{pem,key}. SERVER_NAMES is an openssl subjectAltName list
# (default: DNS:localhost,IP:127.0.0.1). For tests and local trials only: keys are unencrypted
# and the CA key is left beside the certs.
set -euo pipefail
dir=${1:?usage: gen_certs.sh DIR [SERVER_NAMES]}
names=${2:-DNS:localhost,IP:127.0.0.1}
days=30
mkdir -p "$dir"
cd "$dir"
umask 077

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=slimrank test CA" -keyout ca.key -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  2>/dev/null

issue() {  # name, subject CN, extensions
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
    -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

issue server "slimrank server" "subjectAltName=$names
extendedKeyUsage=serverAuth"
issue client "slimrank client" "extendedKeyUsage=clientAuth"
rm -f ca.srl
chmod 644 ./*.pem
echo "wrote $dir/{ca,server,client}.{pem,key}"
