"""The tests' fixtures: a script's main() run in this process (run_main) and local HTTP servers (serve). What
the tests share besides is in helpers.py."""

import importlib
import signal
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import pytest


@pytest.fixture
def run_main(monkeypatch, capsys):
    """run_main(script, *args, cwd=None): the script's main() in this process (in folder cwd), as `python
    script args` runs it but without starting a new interpreter -> a CompletedProcess, as run_script gives."""
    import torch

    import errors
    import files

    def run(script, *args, cwd=None):
        module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
        monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
        capsys.readouterr()
        handler, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
        try:
            with monkeypatch.context() as m:
                if cwd is not None:
                    m.chdir(cwd)
                errors.run(module.main)
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            signal.signal(signal.SIGTERM, handler)  # (errors.run makes SIGTERM a Ctrl-C)
            torch.set_num_threads(threads)  # (a script may set its own)
            for lock in files.LOCKS:  # a process runs one script: its out-dir locks go when it ends
                lock.release()
            files.LOCKS.clear()
            for folder in files.LOCKED:
                files.remove_if_unused(folder)
            files.LOCKED.clear()
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([script, *args], code, out, err)
    return run


@pytest.fixture
def serve():
    """serve(handler, **attributes) starts an HTTP server on 127.0.0.1 with those attributes and
    .url; every server started is shut down after the test."""
    servers = []

    def start(handler, **attributes):
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.__dict__.update(attributes)
        server.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
