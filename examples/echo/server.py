#!/usr/bin/env python3
"""Echo game server for Lodge (python3 standard library only).

Listens on 0.0.0.0:$PORT over both UDP and TCP, and on $PORT_DEBUG over TCP
when that variable is set. Every message is echoed back unchanged, except:

  exit        reply "bye", then exit with code 0 (ends the process cleanly,
              which destroys all of its rooms)
  env NAME    reply with the value of environment variable NAME ("" if unset),
              except secrets (names with SECRET, TOKEN, PASSWORD, KEY or
              CREDENTIAL): those answer "refused", as a game server must
              never hand its app secret to a player
  peer        reply with the address and port the message came from, as the
              game server sees it (a player's own address through Lodge's
              kernel forwarding)
  auth TOKEN  verify a player token (from Lodge's AuthV1 login) with the app
              secret, as a game server should before trusting a player; reply
              "player ID NAME" or "denied REASON"

Over TCP each received chunk is one message; a trailing newline on a command
is ignored and echoed back on the reply, so `nc` works interactively.
SIGTERM (and SIGINT) print "shutting down" and exit with code 0.
ECHO_STARTUP_DELAY (seconds, default 0) delays binding, to simulate a slow boot.
"""

import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time

DEFAULT_PORT = 7777
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "KEY", "CREDENTIAL")


def log(message):
    print(message, flush=True)


def shutdown(code=0):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def b64url(segment):
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def verify_player(token):
    """Check an HS256 player token against HATHORA_APP_SECRET; return its claims."""
    secret = os.environ.get("HATHORA_APP_SECRET", "").encode("utf-8")
    try:
        header, payload, signature = token.split(".")
        if json.loads(b64url(header)).get("alg") != "HS256":
            return None, "not HS256"
        expected = hmac.new(secret, f"{header}.{payload}".encode("ascii"), hashlib.sha256)
        if not hmac.compare_digest(expected.digest(), b64url(signature)):
            return None, "bad signature"
        return json.loads(b64url(payload)), None
    except (ValueError, UnicodeError):
        return None, "malformed token"


def respond(message, addr):
    """Return (reply bytes, exit afterwards?) for one received message from addr."""
    newline = b"\n" if message.endswith(b"\n") else b""
    command = message.rstrip(b"\r\n")
    if command == b"exit":
        return b"bye" + newline, True
    if command == b"peer":
        return f"{addr[0]}:{addr[1]}".encode("ascii") + newline, False
    if command.startswith(b"env "):
        name = command[4:].decode("utf-8", "replace").strip()
        if any(word in name.upper() for word in SECRET_WORDS):
            return b"refused" + newline, False
        return os.environ.get(name, "").encode("utf-8") + newline, False
    if command.startswith(b"auth "):
        claims, error = verify_player(command[5:].decode("utf-8", "replace").strip())
        if claims is None:
            return f"denied {error}".encode("utf-8") + newline, False
        log(f"player {claims.get('id')} ({claims.get('type')}) joined")
        reply = f"player {claims.get('id')} {claims.get('name')}"
        return reply.encode("utf-8") + newline, False
    return message, False


def serve_udp(sock):
    while True:
        data, addr = sock.recvfrom(65535)
        reply, leave = respond(data, addr)
        sock.sendto(reply, addr)
        if leave:
            log("exit requested over udp; bye")
            shutdown(0)


def serve_tcp_connection(conn, addr, label):
    log(f"tcp connection from {addr[0]}:{addr[1]} on {label} port")
    with conn:
        while True:
            try:
                data = conn.recv(65535)
            except OSError:
                break
            if not data:
                break
            reply, leave = respond(data, addr)
            try:
                conn.sendall(reply)
            except OSError:
                break
            if leave:
                log("exit requested over tcp; bye")
                shutdown(0)
    log(f"tcp connection from {addr[0]}:{addr[1]} closed")


def serve_tcp(sock, label):
    while True:
        conn, addr = sock.accept()
        threading.Thread(
            target=serve_tcp_connection, args=(conn, addr, label), daemon=True
        ).start()


def bind_tcp(port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(128)
    return sock


def bind_udp(port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    return sock


def on_signal(signum, _frame):
    log("shutting down")
    shutdown(0)


def main():
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    delay = float(os.environ.get("ECHO_STARTUP_DELAY", "0") or 0)
    if delay > 0:
        log(f"delaying startup by {delay} s")
        time.sleep(delay)

    port = int(os.environ.get("PORT", DEFAULT_PORT))
    udp = bind_udp(port)
    tcp = bind_tcp(port)
    threading.Thread(target=serve_tcp, args=(tcp, "default"), daemon=True).start()

    debug_port = os.environ.get("PORT_DEBUG")
    if debug_port:
        debug = bind_tcp(int(debug_port))
        threading.Thread(target=serve_tcp, args=(debug, "debug"), daemon=True).start()
        log(f"debug tcp echo listening on port {debug_port}")

    log(f"echo server listening on port {port}")
    greeting = os.environ.get("GREETING")
    if greeting:
        log(f"greeting: {greeting}")
    serve_udp(udp)


if __name__ == "__main__":
    main()
