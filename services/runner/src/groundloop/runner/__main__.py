"""`python -m groundloop.runner [--slots N | --gpus 0,1,2,3 --gpus-per-run 1] [--resource-class cpu]
[--require-full-isolation] [--run-uid-base UID]`

Settings: GROUNDLOOP_* (broker, data dir; groundloop.settings) and GROUNDLOOP_RUNNER_* or the
flags below (groundloop.runner.slots.RunnerSettings). SIGTERM/SIGINT: stop fetching, finish or
hand back the current runs, exit.
"""

from __future__ import annotations

import argparse

from groundloop.runner.service import role
from groundloop.runner.slots import RunnerSettings
from groundloop.skeleton import serve

FLAGS = (
    "resource-class",
    "slots",
    "gpus",
    "gpus-per-run",
    "backend",
    "image",
    "prefetch",
    "shutdown-grace-s",
    "runner-id",
    "run-uid-base",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m groundloop.runner", description=(__doc__ or "").split("\n")[0]
    )
    for name in FLAGS:
        parser.add_argument(f"--{name}")
    parser.add_argument(
        "--require-full-isolation",
        action="store_true",
        default=None,
        help="refuse to start unless every sandbox protection is in force on this host",
    )
    flags = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    runner = RunnerSettings(**flags)  # a bad flag fails here, before anything connects
    serve("runner", lambda settings: role(settings, runner))


if __name__ == "__main__":
    main()
