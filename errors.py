"""Bad input a user can fix, and how a script ends: one line for it, a traceback for our own bugs."""

import os
import signal
import sys

import torch


class UserError(Exception):
    """Bad input a user can fix: printed as one line, without a traceback."""


def out_of_memory(e):
    return (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)
            or "not enough memory" in str(e))


def run(main):
    """Run a script's main(): bad input, a missing or unwritable file, memory that runs out end it with one
    line on stderr and exit code 1; Ctrl-C or SIGTERM with exit code 130. GPT2_DEBUG=1 shows the traceback."""
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))  # a kill is a Ctrl-C: the same clean stop
    try:
        main()
    except (UserError, ValueError, OSError, RuntimeError) as e:  # OSError: missing files, full disks, ...
        if os.environ.get("GPT2_DEBUG") or isinstance(e, RuntimeError) and not out_of_memory(e):
            raise
        hint = "; use a smaller --batch-size, --context-length or model" if out_of_memory(e) else ""
        print(f"error: {' '.join(str(e).split())[:500]}{hint}", file=sys.stderr)  # one line, whatever e holds
        sys.exit(1)
    except KeyboardInterrupt:
        if os.environ.get("GPT2_DEBUG"):
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
