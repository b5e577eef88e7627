"""The tests' fixtures: a script's main() run in this process (run_main) and local HTTP servers (serve). What
the tests share besides is in helpers.py."""

import threading
from http.server import ThreadingHTTPServer

import pytest


@pytest.fixture
def run_main():
    """run_main(script, *args, cwd=None, env=None): helpers.run_in_process, the script's main() in this
    process -> a CompletedProcess, as run_script gives."""
    from tests.helpers import run_in_process

    return run_in_process


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
