"""One role process of `groundloop search --role-processes`: a role's own entry point
(`python -m groundloop.<role> [flags]`) run in a process whose life is tied to the search's.

    python -m groundloop.cli.role_child groundloop.runner --slots 2 --resource-class cpu

Before the role starts, the kernel is asked (Linux prctl PR_SET_PDEATHSIG) to send this
process SIGTERM when the search's process dies, however it dies (SIGKILL, a crash): the role
then stops as it does on any SIGTERM (finishes or hands back the event in hand), so no role
outlives its search. The search's pid comes in GROUNDLOOP_SEARCH_PID; a search that died
before the request was made is caught by comparing it with the parent pid afterwards.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

SEARCH_PID_VARIABLE = "GROUNDLOOP_SEARCH_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux only; elsewhere the search's own
    clean-up is the only guard, so a SIGKILLed search could leave its roles running)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise SystemExit(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m groundloop.cli.role_child MODULE [ARGS...]")
    module, *rest = args
    die_with_parent()
    search_pid = os.environ.get(SEARCH_PID_VARIABLE)
    if search_pid is not None and os.getppid() != int(search_pid):
        raise SystemExit(f"the search (pid {search_pid}) that started {module} is gone")
    sys.argv = [module, *rest]  # what the role's argparse reads, as under `python -m`
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
