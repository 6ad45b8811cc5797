"""Tries what the sandbox must deny and publishes what happened, to topic `out`.

Payload `file`: reads /etc/passwd. `socket`: connects to 127.0.0.1:22. `env`: counts environment
variables. `bug` raises an exception the SDK does not map (the call traps). Each probe publishes `denied: <error>` (or `env: <n> vars`); anything that got through
publishes `ALLOWED: ...`, which the sandbox fixture would catch.
"""

import os

from lockgate_sdk import Reject, handler, publish


def try_file():
    try:
        with open("/etc/passwd", "rb") as f:
            data = f.read()
        return f"ALLOWED: read {len(data)} bytes"
    except Exception as e:  # noqa: BLE001 - whatever the sandbox raises is the answer
        return f"denied: {type(e).__name__}: {e}"


def try_socket():
    try:
        import socket

        conn = socket.create_connection(("127.0.0.1", 22), timeout=1)
        conn.close()
        return "ALLOWED: connected"
    except Exception as e:  # noqa: BLE001
        return f"denied: {type(e).__name__}: {e}"


def try_env():
    names = sorted(os.environ)
    return f"env: {len(names)} vars {names}"


def bug():
    raise RuntimeError("a bug in the handler")


TRIES = {"file": try_file, "socket": try_socket, "env": try_env, "bug": bug}


@handler
def handle(msg):
    what = msg.text()
    if what not in TRIES:
        raise Reject(f"unknown probe `{what}`; expected one of {sorted(TRIES)}")
    publish("out", TRIES[what]())
