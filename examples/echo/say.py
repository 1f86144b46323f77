#!/usr/bin/env python3
"""Send one UDP message to a room and print the reply: say.py HOST:PORT [MESSAGE]"""

import socket
import sys

host, port = sys.argv[1].rsplit(":", 1)
message = " ".join(sys.argv[2:]) or "hello"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
for attempt in range(5):
    s.sendto(message.encode(), (host, int(port)))
    try:
        print(s.recvfrom(65535)[0].decode())
        break
    except socket.timeout:
        continue
else:
    sys.exit(f"no reply from {host}:{port}")
