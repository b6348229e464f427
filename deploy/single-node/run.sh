#!/usr/bin/env bash
# Runs Kura on this machine with Podman: the image built from the
# repository's Containerfile (packaging/build-image), this directory's
# config.yml, the cache in the named volume kura-cache, port 5000.
#
#   deploy/single-node/run.sh                 # image kura:latest
#   KURA_IMAGE=registry.example.com/kura:0.1.0 deploy/single-node/run.sh
#
# Then point clients at http://THIS-HOST:5000 (README.md, "Client setup"),
# and check it:
#
#   curl http://localhost:5000/readyz
#   curl http://localhost:5000/v2/_catalog
#
# Docker works the same way: replace `podman` with `docker`.
set -euo pipefail

image=${KURA_IMAGE:-kura:latest}
name=${KURA_NAME:-kura}
port=${KURA_PORT:-5000}
config="$(cd "$(dirname "$0")" && pwd)/config.yml"

# Check the configuration with the image's own binary before starting.
podman run --rm \
  -v "$config:/etc/kura/config.yml:ro,Z" \
  --entrypoint /kura "$image" config check /etc/kura/config.yml >/dev/null

# --read-only: Kura writes only to its volume.
# --stop-timeout: `podman stop` waits 10 s by default before SIGKILL; Kura
#   drains for http.draintimeout (30 s in config.yml), so allow more.
# The named volume takes the image's ownership of /var/lib/kura (uid 65532).
podman run -d \
  --name "$name" \
  --restart unless-stopped \
  --read-only \
  --stop-timeout 40 \
  -p "$port:5000" \
  -v kura-cache:/var/lib/kura \
  -v "$config:/etc/kura/config.yml:ro,Z" \
  "$image" /etc/kura/config.yml

echo "Kura is starting on port $port; logs: podman logs -f $name"
