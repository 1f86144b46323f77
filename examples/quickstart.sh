#!/usr/bin/env bash
# From nothing to a UDP reply from a live room, with curl and python3 only.
# Usage: examples/quickstart.sh [API_URL]   (default http://127.0.0.1:5634)
# Reads the token from $LODGE_TOKEN, else ./lodge-data/admin-token.
set -euo pipefail
API=${1:-${LODGE_API_URL:-http://127.0.0.1:5634}}
TOKEN=${LODGE_TOKEN:-$(cat "${LODGE_DATA_DIR:-./lodge-data}/admin-token")}
HERE=$(cd "$(dirname "$0")" && pwd)
auth=(-H "Authorization: Bearer $TOKEN")
json=(-H "Content-Type: application/json")
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

# 1. An application.
APP=$(curl -fsS "${auth[@]}" "${json[@]}" -d "{\"appName\":\"quickstart-$RANDOM\",\"authConfiguration\":{}}" \
  "$API/apps/v2/apps" | field '["appId"]')
echo "app        $APP"

# 2. A build: tar the echo server, upload it in parts, run the build.
TGZ=$(mktemp --suffix=.tgz)
tar czf "$TGZ" -C "$HERE/echo" .
SIZE=$(stat -c %s "$TGZ")
curl -fsS "${auth[@]}" "${json[@]}" -d "{\"buildSizeInBytes\":$SIZE,\"buildTag\":\"quickstart\"}" \
  "$API/builds/v3/builds" >"$TGZ.json"
BUILD=$(field '["buildId"]' <"$TGZ.json")
python3 - "$TGZ" "$TGZ.json" <<'PY'
import json, sys, urllib.request
data = open(sys.argv[1], "rb").read()
b = json.load(open(sys.argv[2]))
parts = []
for p in b["uploadParts"]:
    n, size = p["partNumber"], b["maxChunkSize"]
    req = urllib.request.Request(p["putRequestUrl"], data=data[(n - 1) * size:n * size], method="PUT")
    with urllib.request.urlopen(req) as r:
        parts.append(f"<Part><PartNumber>{n}</PartNumber><ETag>{r.headers['ETag']}</ETag></Part>")
xml = "<CompleteMultipartUpload>" + "".join(parts) + "</CompleteMultipartUpload>"
req = urllib.request.Request(b["completeUploadPostRequestUrl"], data=xml.encode(), method="POST",
                             headers={"Content-Type": "application/xml"})
urllib.request.urlopen(req).read()
PY
curl -fsS -X POST "${auth[@]}" "$API/builds/v3/builds/$BUILD/run" | sed 's/^/  build: /'
rm -f "$TGZ" "$TGZ.json"
echo "build      $BUILD"

# 3. A deployment: UDP on container port 7777, two rooms per process.
DEP=$(curl -fsS "${auth[@]}" "${json[@]}" -d "{\"buildId\":\"$BUILD\",\"idleTimeoutEnabled\":true,\"env\":[],
  \"roomsPerProcess\":2,\"transportType\":\"udp\",\"containerPort\":7777,\"requestedCPU\":0.5,\"requestedMemoryMB\":512}" \
  "$API/deployments/v3/apps/$APP/deployments" | field '["deploymentId"]')
echo "deployment $DEP"

# 4. A room, then poll its connection info until it is active.
ROOM=$(curl -fsS "${auth[@]}" "${json[@]}" -d '{"region":"London"}' "$API/rooms/v2/$APP/create" | field '["roomId"]')
echo "room       $ROOM"
for _ in $(seq 100); do
  INFO=$(curl -fsS "$API/rooms/v2/$APP/connectioninfo/$ROOM")
  [ "$(echo "$INFO" | field '["status"]')" = active ] && break
  sleep 0.1
done
HOST=$(echo "$INFO" | field '["exposedPort"]["host"]')
PORT=$(echo "$INFO" | field '["exposedPort"]["port"]')
echo "active     $HOST:$PORT"

# 5. Talk to the game server over UDP through Lodge's proxy.
python3 - "$HOST" "$PORT" <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(b"hello from quickstart", (sys.argv[1], int(sys.argv[2])))
print("reply     ", s.recvfrom(2048)[0].decode())
PY
