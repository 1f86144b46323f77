#!/usr/bin/env python3
"""Arena: a small tick-based UDP multiplayer game server for Lodge (python3 stdlib only).

Players join a room, move on a square grid and race for a coin; the first to reach the room's
target score wins. One process hosts up to HATHORA_ROOMS_PER_PROCESS rooms. Each room's config
is JSON such as {"targetScore": 5, "size": 16}, read from the Lodge/Hathora API (rooms of this
process) when a developer token is in HATHORA_DEV_TOKEN, else from HATHORA_INITIAL_ROOM_CONFIG.
When a match ends the room is destroyed through the API; when no room is left, the process
exits with code 0, which is how a match ends cleanly on Hathora and on Lodge.

Protocol, one UTF-8 line per datagram:
  client: join ROOM_ID NAME | move DX DY | quit
  server: welcome ROOM_ID PLAYER_ID | error REASON | state {json} | over WINNER
"""

import json
import os
import random
import signal
import socket
import sys
import time
import urllib.error
import urllib.request

PORT = int(os.environ.get("PORT", "7777"))
TICK = 1.0 / float(os.environ.get("TICK_RATE", "10"))
API = os.environ.get("LODGE_API_URL", "").rstrip("/")
APP_ID = os.environ.get("HATHORA_APP_ID", "")
PROCESS_ID = os.environ.get("HATHORA_PROCESS_ID", "")
TOKEN = os.environ.get("HATHORA_DEV_TOKEN") or os.environ.get("LODGE_TOKEN")
IDLE_DROP = 10.0


def log(msg):
    print(msg, flush=True)


def parse_config(text):
    try:
        cfg = json.loads(text) if text else {}
    except ValueError:
        cfg = {}
    if not isinstance(cfg, dict):
        cfg = {}
    target = cfg.get("targetScore", 5)
    size = cfg.get("size", 16)
    target = target if isinstance(target, int) and 1 <= target <= 100 else 5
    size = size if isinstance(size, int) and 4 <= size <= 64 else 16
    return target, size


def api(method, path):
    req = urllib.request.Request(API + path, method=method, headers={"Authorization": "Bearer " + TOKEN})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read()
        return json.loads(body) if body else None


def room_configs():
    """Rooms this process hosts, {roomId: roomConfig}, or None when any room id is accepted."""
    if TOKEN and API:
        try:
            rooms = api("GET", f"/rooms/v2/{APP_ID}/list/{PROCESS_ID}/active")
            return {r["roomId"]: r.get("roomConfig") for r in rooms}
        except (urllib.error.URLError, OSError, ValueError) as e:
            log(f"cannot list rooms: {e}")
    return None


class Player:
    def __init__(self, pid, name, addr, x, y):
        self.id, self.name, self.addr = pid, name, addr
        self.x, self.y, self.dx, self.dy, self.score = x, y, 0, 0, 0
        self.seen = time.monotonic()


class Room:
    def __init__(self, room_id, config):
        self.id = room_id
        self.target, self.size = parse_config(config)
        self.players = {}
        self.coin = self.free_cell()
        self.tick = 0
        self.winner = None
        self.over_sent = 0

    def free_cell(self):
        taken = {(p.x, p.y) for p in getattr(self, "players", {}).values()}
        while True:
            cell = (random.randrange(self.size), random.randrange(self.size))
            if cell not in taken:
                return cell

    def step(self):
        self.tick += 1
        now = time.monotonic()
        for addr in [a for a, p in self.players.items() if now - p.seen > IDLE_DROP]:
            log(f"room {self.id}: {self.players[addr].name} timed out")
            del self.players[addr]
        for p in self.players.values():
            p.x = min(self.size - 1, max(0, p.x + p.dx))
            p.y = min(self.size - 1, max(0, p.y + p.dy))
            if (p.x, p.y) == self.coin:
                p.score += 1
                self.coin = self.free_cell()
                if p.score >= self.target and self.winner is None:
                    self.winner = p.name

    def state(self):
        return json.dumps({
            "room": self.id, "tick": self.tick, "size": self.size, "target": self.target,
            "coin": list(self.coin),
            "players": [{"id": p.id, "name": p.name, "x": p.x, "y": p.y, "score": p.score}
                        for p in self.players.values()],
        }, separators=(",", ":"))


def main():
    signal.signal(signal.SIGTERM, lambda *_: (log("SIGTERM: shutting down"), sys.exit(0)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", PORT))
    log(f"arena listening on udp {PORT} (process {PROCESS_ID or '-'}, tick {TICK:.3f}s)")
    rooms, by_addr, finished = {}, {}, set()
    next_id = 1
    next_tick = time.monotonic() + TICK
    initial = os.environ.get("HATHORA_INITIAL_ROOM_ID")
    initial_cfg = os.environ.get("HATHORA_INITIAL_ROOM_CONFIG")
    while True:
        # A zero timeout makes the socket non-blocking, which raises BlockingIOError instead.
        sock.settimeout(max(0.0, next_tick - time.monotonic()))
        try:
            data, addr = sock.recvfrom(2048)
        except (socket.timeout, BlockingIOError):
            data = None
        if data is not None:
            parts = data.decode("utf-8", "replace").strip().split()
            if parts[:1] == ["join"] and len(parts) >= 2:
                room_id, name = parts[1], (parts[2] if len(parts) > 2 else "player")[:16]
                if room_id in finished:
                    sock.sendto(b"error match over", addr)
                    continue
                room = rooms.get(room_id)
                if room is None:
                    configs = room_configs()
                    if configs is not None and room_id not in configs:
                        sock.sendto(b"error no such room on this server", addr)
                        continue
                    cfg = configs.get(room_id) if configs is not None else (initial_cfg if room_id == initial else None)
                    room = rooms[room_id] = Room(room_id, cfg)
                    log(f"room {room_id}: opened (target {room.target}, size {room.size})")
                player = room.players.get(addr)
                if player is None:
                    player = Player(next_id, name, addr, *room.free_cell())
                    next_id += 1
                    room.players[addr] = player
                    by_addr[addr] = room
                    log(f"room {room_id}: {name} joined from {addr[0]}:{addr[1]}")
                player.seen = time.monotonic()
                sock.sendto(f"welcome {room_id} {player.id}".encode(), addr)
            elif addr in by_addr:
                room = by_addr[addr]
                player = room.players.get(addr)
                if player is None:
                    continue
                player.seen = time.monotonic()
                if parts[:1] == ["move"] and len(parts) == 3:
                    try:
                        player.dx = max(-1, min(1, int(parts[1])))
                        player.dy = max(-1, min(1, int(parts[2])))
                    except ValueError:
                        pass
                elif parts[:1] == ["quit"]:
                    del room.players[addr]
                    del by_addr[addr]
            continue
        next_tick += TICK
        for room in list(rooms.values()):
            if room.winner is None:
                room.step()
                msg = ("state " + room.state()).encode()
                for p in room.players.values():
                    sock.sendto(msg, p.addr)
                continue
            # Tell everyone a few times (UDP), then close the room.
            for p in room.players.values():
                sock.sendto(f"over {room.winner}".encode(), p.addr)
            room.over_sent += 1
            if room.over_sent < 5:
                continue
            log(f"match over in room {room.id}: {room.winner} wins")
            del rooms[room.id]
            finished.add(room.id)
            for addr in [a for a, r in by_addr.items() if r is room]:
                del by_addr[addr]
            if TOKEN and API:
                try:
                    api("POST", f"/rooms/v2/{APP_ID}/destroy/{room.id}")
                except (urllib.error.URLError, OSError, ValueError) as e:
                    log(f"cannot destroy room {room.id}: {e}")
            remaining = room_configs()
            waiting = [r for r in (remaining or {}) if r not in finished]
            if not rooms and not waiting:
                log("no room left: exiting 0")
                sys.exit(0)


if __name__ == "__main__":
    main()
