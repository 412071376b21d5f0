#!/bin/bash
# The Dockerfile's steps, where no image registry is reachable: a fresh Debian 12 root made
# by debootstrap (the image's debian:bookworm-slim), the build stage's packages and
# deploy/install.sh in it, the runtime stage's user; then the server run from that root as
# the image runs it (that user, `fastfan run --workers auto`), its HEALTHCHECK command,
# /ready, a token, a WebSocket subscribe and publish, and a drain on SIGTERM.
#
# Root, Debian's mirror and PyPI needed; about 5 minutes on 2 cores, so not in CI:
#   sudo deploy/check-image.sh [ROOT]    (default /tmp/fastfan-image-root, made anew)
set -euo pipefail
root=${1:-/tmp/fastfan-image-root}
source_tree=$(cd "$(dirname "$0")/.." && pwd)
port=18080
secret=$(head -c 32 /dev/urandom | base64)

in_root() { chroot "$root" /usr/bin/env -i PATH=/opt/fastfan/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
cleanup() {
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null || true
  umount "$root/proc" "$root/dev" 2>/dev/null || true
}
trap cleanup EXIT

rm -rf "$root"
debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
cp /etc/resolv.conf "$root/etc/resolv.conf"

echo "== the build stage"
in_root apt-get update
in_root apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
  python3-dev gcc libc6-dev
mkdir -p "$root/src"
git -C "$source_tree" archive HEAD | tar -x -C "$root/src"
# Where this host reaches PyPI through a TLS-inspecting proxy (pip's PIP_CERT names its CA
# bundle), pip in the root needs that bundle too; an image build elsewhere does not.
if [ -n "${PIP_CERT:-}" ]; then
  cp "$PIP_CERT" "$root/host-ca.crt"
  in_root PIP_CERT=/host-ca.crt sh -c 'cd /src && deploy/install.sh /opt/fastfan'
else
  in_root sh -c 'cd /src && deploy/install.sh /opt/fastfan'
fi

echo "== the runtime stage: its user (gcc stays, unlike the image's second stage)"
in_root useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin fastfan

echo "== fastfan run --workers auto, as that user"
chroot --userspec=10001:10001 "$root" /usr/bin/env -i PATH=/opt/fastfan/bin:/usr/bin:/bin \
  FASTFAN_JWT_SECRET="$secret" FASTFAN_PORT=$port FASTFAN_HOST=127.0.0.1 \
  FASTFAN_SHUTDOWN_GRACE=2 fastfan run --workers auto > "$root/fastfan.log" 2>&1 &
server=$!
for _ in $(seq 100); do
  in_root python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null && break
  sleep 0.1
done
echo "== the HEALTHCHECK's command"
chroot --userspec=10001:10001 "$root" /usr/bin/env -i FASTFAN_PORT=$port python3 -c \
  "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('FASTFAN_PORT', '8080'), timeout=2)"
echo "healthy"
echo "== /ready, and a client"
in_root /opt/fastfan/bin/python - "$port" "$secret" <<'PY'
import asyncio, json, sys, urllib.request
from fastfan.auth import mint_token
port, secret = sys.argv[1], sys.argv[2]
for _ in range(100):
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2).status == 200:
            break
    except OSError:
        pass
    import time; time.sleep(0.1)
print("ready")
from fastfan.client import Client  # the Python client that ships with fastfan
async def main() -> None:
    token = mint_token(secret, "alice")
    async with Client(f"ws://127.0.0.1:{port}/", token=token) as client:
        subscription = await client.subscribe("image.check")
        await client.publish("image.check", {"hello": "from the image"})
        async for message in subscription:
            print("received", json.dumps(message["data"]))
            break
asyncio.run(main())
PY
echo "== SIGTERM: a drain, exit 0"
kill -TERM "$server"
wait "$server"
echo "exit status $?"
server=
grep -E "fastfan on|workers|stopp" "$root/fastfan.log"
echo "== ok"
