"""Data-parallel training on one machine without torchrun: `python train.py --nproc-per-node N` starts N
copies of the run, one process each, with the variables torchrun gives them (RANK, WORLD_SIZE, ...), and ends
as they end. The user talks to this process alone: the copies run in a session of their own, so a Ctrl-C or
a SIGTERM reaches each copy once, from here (each finishes its step, saves and stops), a second Ctrl-C quits
them unsaved, and a copy that fails stops the others."""

import os
import signal
import socket
import subprocess
import sys
import time

GRACE = 30  # seconds a copy has to stop after a SIGTERM, when another failed, before it is killed


def free_port():
    """A port on 127.0.0.1 that nobody listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n):
    """Run this script (sys.argv) in n processes, then exit as they did: 0, 130 if they were stopped, else
    the first failure's code."""
    port, procs = free_port(), []

    def forward(signum, frame):  # once per signal that reaches this process
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, forward)
    for rank in range(n):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, *sys.argv], env=env, start_new_session=True))
    failed = None
    while any(p.poll() is None for p in procs):
        if failed is None:
            failed = next((rank for rank, p in enumerate(procs) if p.poll() not in (None, 0, 130)), None)
            if failed is not None:
                forward(signal.SIGTERM, None)
                deadline = time.time() + GRACE
        elif time.time() > deadline:
            for p in procs:
                p.kill()
        time.sleep(0.05)
    if failed is not None:
        code = procs[failed].returncode
        print(f"error: process {failed} of {n} ended with exit code {code}, and the others were stopped "
              "(its message is above)", file=sys.stderr)
        sys.exit(code if code > 0 else 1)
    sys.exit(130 if any(p.returncode == 130 for p in procs) else 0)
