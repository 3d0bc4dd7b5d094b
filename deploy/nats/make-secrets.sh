#!/usr/bin/env bash
# Generate what deploy/nats/groundloop.conf and the services need, into deploy/nats/secrets/:
#   credentials/<role>.nk      each role's nkey seed (0600; give a service only its own)
#   credentials/public-keys.json every role's public key (every reader verifies with them)
#   credentials/nats-keys.env  GROUNDLOOP_NKEY_<ROLE>=<public key>, the server's environment
#   tls/ca.crt, tls/server.{crt,key}  a private CA and the broker's certificate for HOSTNAME
# Existing seeds and certificates are kept; delete one and rerun to rotate it.
# Usage: deploy/nats/make-secrets.sh [HOSTNAME (default nats)] [PYTHON (default python3)]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
host="${1:-nats}"
python="${2:-python3}"
out="$here/secrets"
mkdir -p "$out/tls"
"$python" -m groundloop.identity keys "$out/credentials"
cd "$out/tls"
key=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
if [ ! -f ca.crt ]; then
  openssl req -x509 "${key[@]}" -keyout ca.key -out ca.crt -days 3650 -subj "/CN=groundloop-nats-ca"
fi
if [ ! -f server.crt ]; then
  openssl req "${key[@]}" -keyout server.key -out server.csr -subj "/CN=$host"
  printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\n' "$host" > san.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out server.crt -days 825 -extfile san.ext
fi
chmod 600 ca.key server.key
echo "secrets in $out (keep ca.key off every machine but the one that signs certificates)"
