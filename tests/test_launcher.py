"""launcher.py on a script of a few lines: the variables each process gets, and how the run ends when one
of them fails."""

import json
import subprocess
import sys
import time

from tests.helpers import ROOT

CHILD = """import json, os, sys, time
names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
line = json.dumps({k: os.environ[k] for k in names} | {"argv": sys.argv[1:]}) + "\\n"
os.write(1, line.encode())  # one write: the processes share the pipe, and their lines must not mix
if os.environ["RANK"] == sys.argv[1]:
    sys.exit(3)
time.sleep(float(sys.argv[2]))
"""


def launch(tmp_path, n, *argv):
    (tmp_path / "child.py").write_text(CHILD)
    code = f"import sys, launcher; sys.argv = {[str(tmp_path / 'child.py'), *argv]!r}; launcher.launch({n})"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_each_process_gets_torchruns_variables_and_the_same_arguments(tmp_path):
    r = launch(tmp_path, 3, "none", "0")
    assert r.returncode == 0, r.stderr
    seen = sorted((json.loads(line) for line in r.stdout.splitlines()), key=lambda v: v["RANK"])
    assert [(v["RANK"], v["LOCAL_RANK"], v["WORLD_SIZE"], v["LOCAL_WORLD_SIZE"]) for v in seen] == \
           [(str(i), str(i), "3", "3") for i in range(3)]
    assert {(v["MASTER_ADDR"], v["MASTER_PORT"]) for v in seen} == {("127.0.0.1", seen[0]["MASTER_PORT"])}
    assert all(v["argv"] == ["none", "0"] for v in seen)


def test_a_process_that_fails_stops_the_others_and_is_named(tmp_path):
    t0 = time.time()
    r = launch(tmp_path, 2, "1", "60")  # process 1 fails at once; process 0 would sleep a minute
    assert time.time() - t0 < 30  # the other was stopped, not waited for
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
           "error: process 1 of 2 ended with exit code 3, and the others were stopped (its message is above)"
