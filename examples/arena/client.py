#!/usr/bin/env python3
"""Arena client: client.py HOST:PORT ROOM_ID [--name NAME] [--bot]

Interactive: arrows or WASD to move, space to stop, q to quit (curses).
--bot: steer toward the coin until the match ends; prints "winner: NAME" and exits 0
(exit 1 if no result within 60 s).
"""

import argparse
import json
import socket
import sys
import time


def connect(addr, room, name):
    host, port = addr.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, int(port)))
    sock.settimeout(0.5)
    for _ in range(20):
        sock.send(f"join {room} {name}".encode())
        try:
            reply = sock.recv(65535).decode()
        except (socket.timeout, ConnectionRefusedError):
            continue
        if reply.startswith("welcome"):
            return sock, int(reply.split()[2])
        if reply.startswith("error"):
            sys.exit(f"cannot join: {reply[6:]}")
    sys.exit(f"no answer from {addr}")


def sign(v):
    return (v > 0) - (v < 0)


def bot(sock, me):
    deadline = time.monotonic() + 60
    last = None
    while time.monotonic() < deadline:
        try:
            msg = sock.recv(65535).decode()
        except (socket.timeout, ConnectionRefusedError):
            continue
        if msg.startswith("over "):
            print(f"winner: {msg[5:]}", flush=True)
            return 0
        if not msg.startswith("state "):
            continue
        state = json.loads(msg[6:])
        mine = next((p for p in state["players"] if p["id"] == me), None)
        if mine is None:
            continue
        cx, cy = state["coin"]
        dx, dy = sign(cx - mine["x"]), sign(cy - mine["y"])
        move = (dx, 0) if dx else (0, dy)
        if move != last:
            sock.send(f"move {move[0]} {move[1]}".encode())
            last = move
    print("no result within 60 s", file=sys.stderr)
    return 1


def interactive(sock, me):
    import curses

    keys = {
        curses.KEY_UP: (0, -1), curses.KEY_DOWN: (0, 1), curses.KEY_LEFT: (-1, 0), curses.KEY_RIGHT: (1, 0),
        ord("w"): (0, -1), ord("s"): (0, 1), ord("a"): (-1, 0), ord("d"): (1, 0), ord(" "): (0, 0),
    }

    def run(screen):
        curses.curs_set(0)
        screen.nodelay(True)
        sock.settimeout(0.05)
        result = None
        while True:
            key = screen.getch()
            if key == ord("q"):
                sock.send(b"quit")
                return result
            if key in keys:
                sock.send("move {} {}".format(*keys[key]).encode())
            try:
                msg = sock.recv(65535).decode()
            except (socket.timeout, ConnectionRefusedError):
                continue
            if msg.startswith("over "):
                result = msg[5:]
                screen.addstr(0, 0, f"match over: {result} wins. q to quit ")
                screen.refresh()
                continue
            if not msg.startswith("state "):
                continue
            st = json.loads(msg[6:])
            screen.erase()
            screen.addstr(0, 0, f"room {st['room']}  first to {st['target']}  tick {st['tick']}")
            for y in range(st["size"]):
                screen.addstr(1 + y, 0, ". " * st["size"])
            cx, cy = st["coin"]
            screen.addstr(1 + cy, 2 * cx, "$")
            for i, p in enumerate(st["players"]):
                mark = "@" if p["id"] == me else chr(ord("A") + i % 26)
                screen.addstr(1 + p["y"], 2 * p["x"], mark)
                screen.addstr(2 + st["size"] + i, 0, f"{mark} {p['name']}: {p['score']}")
            screen.refresh()

    winner = curses.wrapper(run)
    if winner:
        print(f"winner: {winner}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("address", help="HOST:PORT from `lodge rooms create --wait`")
    ap.add_argument("room", help="the room id")
    ap.add_argument("--name", default="player")
    ap.add_argument("--bot", action="store_true", help="play automatically")
    args = ap.parse_args()
    sock, me = connect(args.address, args.room, args.name)
    sys.exit(bot(sock, me) if args.bot else interactive(sock, me))


if __name__ == "__main__":
    main()
