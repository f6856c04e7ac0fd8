#!/usr/bin/env bash
# Certificates for mutual TLS between Mosquitto, the worker and the F2 controllers.
#
#   ./make-certs.sh [-o DIR] [CLIENT_NAME ...]
#   ./make-certs.sh -o /etc/iotflow/certs worker f2-aabbccddee01 f2-aabbccddee02
#
# Writes into DIR (default: the current directory):
#   ca.crt  ca.key                 the certificate authority (10 years)
#   server.crt  server.key         the broker (SAN: SERVER_SANS)
#   NAME.crt  NAME.key             one client certificate per NAME, CN=NAME
#
# Idempotent: an existing CA, server or client certificate is kept, never
# overwritten; run it again with new names to add clients. Delete a file to
# have it issued again. Keys are EC P-256, mode 600.
#
# Environment:
#   SERVER_SANS  default "DNS:localhost,DNS:mosquitto,IP:127.0.0.1"
#   LEAF_DAYS    validity of server and client certificates, default 825
#   CA_DAYS      validity of the CA, default 3650
#   CA_SUBJECT   default "/O=IoTFlow/CN=IoTFlow MQTT CA"
set -euo pipefail

usage() {
    sed -n '2,20s/^# \{0,1\}//p' "$0"
}

out_dir=.
while getopts "o:h" opt; do
    case "$opt" in
        o) out_dir=$OPTARG ;;
        h) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))

SERVER_SANS=${SERVER_SANS:-DNS:localhost,DNS:mosquitto,IP:127.0.0.1}
LEAF_DAYS=${LEAF_DAYS:-825}
CA_DAYS=${CA_DAYS:-3650}
CA_SUBJECT=${CA_SUBJECT:-/O=IoTFlow/CN=IoTFlow MQTT CA}

command -v openssl >/dev/null || { echo "make-certs: openssl is not installed" >&2; exit 1; }
mkdir -p "$out_dir"
cd "$out_dir"
umask 077

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

new_key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

make_ca() {
    if [[ -f ca.crt && -f ca.key ]]; then
        echo "keep   ca.crt (exists)"
        return
    fi
    if [[ -f ca.crt || -f ca.key ]]; then
        echo "make-certs: only one of ca.crt/ca.key exists; refusing to replace it" >&2
        exit 1
    fi
    new_key ca.key
    cat >"$work/ca.ext" <<EOF
[req]
distinguished_name = dn
x509_extensions = v3_ca
prompt = no
[dn]
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
    openssl req -new -x509 -key ca.key -subj "$CA_SUBJECT" -days "$CA_DAYS" -sha256 \
        -config "$work/ca.ext" -out ca.crt
    chmod 644 ca.crt
    echo "create ca.crt"
}

# issue NAME EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
issue() {
    local name=$1 usage=$2 sans=${3:-}
    if [[ -f $name.crt && -f $name.key ]]; then
        echo "keep   $name.crt (exists)"
        return
    fi
    new_key "$name.key"
    openssl req -new -key "$name.key" -subj "/O=IoTFlow/CN=$name" -out "$work/$name.csr"
    {
        echo "basicConstraints = critical, CA:FALSE"
        echo "keyUsage = critical, digitalSignature, keyEncipherment"
        echo "extendedKeyUsage = $usage"
        echo "subjectKeyIdentifier = hash"
        echo "authorityKeyIdentifier = keyid, issuer"
        if [[ -n $sans ]]; then echo "subjectAltName = $sans"; fi
    } >"$work/$name.ext"
    openssl x509 -req -in "$work/$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days "$LEAF_DAYS" -sha256 -extfile "$work/$name.ext" -out "$name.crt" 2>/dev/null
    chmod 644 "$name.crt"
    openssl verify -CAfile ca.crt "$name.crt" >/dev/null
    echo "create $name.crt"
}

for name in "$@"; do
    if [[ ! $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
        echo "make-certs: client name '$name' must be letters, digits, '.', '_' or '-'" >&2
        exit 2
    fi
    if [[ $name == ca || $name == server ]]; then
        echo "make-certs: '$name' is reserved for the CA and broker files" >&2
        exit 2
    fi
done

make_ca
issue server serverAuth "$SERVER_SANS"
for name in "$@"; do
    issue "$name" clientAuth
done
echo "certificates in $(pwd)"
