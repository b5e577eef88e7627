"""How a script ends: bad input a user can fix is one line and exit code 1, Ctrl-C or SIGTERM exit code 130,
and anything else is a bug of ours: its traceback, and one line saying so."""

import errno
import os
import signal
import sys
import traceback


class UserError(Exception):
    """Bad input a user can fix: printed as one line, without a traceback."""


def out_of_memory(e):
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"  # (torch's, not imported here)
            or "can't allocate memory" in str(e)
            or "not enough memory" in str(e))


def os_error_line(e):
    """A file that cannot be read or written, as one line that says what to do."""
    where = f"{e.filename}: " if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"{where}the disk is full: free some space (or choose another folder) and run again"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}{e.strerror}: choose a folder you can write to, or change its permissions"
    return f"{where}{e.strerror or e}"


def quit_quietly(signum, frame):
    print("interrupted", file=sys.stderr)
    sys.exit(130)


# A Ctrl-C in a script's first seconds, while it imports torch: exit 130 without a traceback. Each script
# imports this module first; run() then gives Ctrl-C back to Python. (Where the shell made the script ignore
# Ctrl-C, as `cmd &` does, it stays ignored.)
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, quit_quietly)


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # a kill is a Ctrl-C: the same clean stop, however the process was started


def run(main):
    """Run a script's main() and end it as the module's docstring says. GPT2_DEBUG=1 shows every traceback."""
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    if signal.getsignal(signal.SIGINT) is quit_quietly:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a KeyboardInterrupt, caught below
    try:
        main()
    except (UserError, OSError, MemoryError, RuntimeError) as e:
        if os.environ.get("GPT2_DEBUG") or isinstance(e, RuntimeError) and not out_of_memory(e):
            bug(e)
        if out_of_memory(e):
            line = (f"out of memory ({' '.join(str(e).split())}): use a smaller --batch-size, "
                    "--context-length or model")
        else:
            line = os_error_line(e) if isinstance(e, OSError) else " ".join(str(e).split())
        print(f"error: {line}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if os.environ.get("GPT2_DEBUG"):
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        bug(e)


def bug(e):
    traceback.print_exception(e)
    print(f"error: {type(e).__name__} above is a bug in this project, not in what you gave it: please report "
          "it with the traceback", file=sys.stderr)
    sys.exit(1)
