#!/usr/bin/env python3
"""Runs scripts/demo.sh as a person would, from a terminal (a pseudo-terminal): the demo must
print the status page's address, keep serving it until Enter is pressed, then stop everything
it started. A failure says which of those did not happen."""
import os
import pty
import re
import select
import socket
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = re.compile(rb"status page stays up at http://127\.0\.0\.1:(\d+)/ ; press Enter")
NATS = re.compile(rb"Starting nats-server with JetStream on 127\.0\.0\.1:(\d+)")
ANSI = re.compile(rb"\x1b\[[0-9;]*m")


def fail(message, output=b""):
    tail = ANSI.sub(b"", output)[-3000:].decode("utf-8", "replace")
    sys.exit(f"check-demo: {message}\n--- last demo output ---\n{tail}")


def read_until(fd, pattern, seconds, output):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
        match = pattern.search(ANSI.sub(b"", output))
        if match:
            return match, output
    return None, output


def listening(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def main():
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.execvp("bash", ["bash", "scripts/demo.sh"])
    match, output = read_until(fd, PROMPT, 20 * 60, b"")
    if not match:
        os.kill(pid, 15)
        fail("the demo never offered to stay up until Enter", output)
    ui_port = int(match.group(1))
    nats = NATS.search(ANSI.sub(b"", output))
    nats_port = int(nats.group(1)) if nats else None
    # Still up a while later: it waits for Enter, not for a timer.
    time.sleep(3)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/", timeout=10) as answer:
            page = answer.read().decode("utf-8", "replace")
            if answer.status != 200 or "Overview" not in page:
                fail(f"the page answered {answer.status} without its overview", output)
    except OSError as e:
        fail(f"the status page at port {ui_port} did not answer while waiting: {e}", output)
    finished, _ = os.waitpid(pid, os.WNOHANG)
    if finished:
        fail("the demo ended before Enter was pressed", output)
    started = time.monotonic()
    os.write(fd, b"\n")
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                output += os.read(fd, 65536)
            except OSError:
                pass
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
    else:
        os.kill(pid, 9)
        fail("the demo did not end within 60 s of Enter", output)
    took = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        fail(f"the demo exited with {os.waitstatus_to_exitcode(status)}", output)
    left = [p for p in (ui_port, nats_port) if p and listening(p)]
    if left:
        fail(f"ports still served after the demo ended: {left}", output)
    print(f"check-demo: page served on port {ui_port} until Enter; everything stopped {took:.1f} s after it")


if __name__ == "__main__":
    main()
