#!/bin/sh
# Replaced by `iotflow certs` (docs/operations.md): init, broker, device, client, list, revoke, acl.
exec iotflow certs "$@"
