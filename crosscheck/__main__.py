"""``python -m crosscheck`` and the ``crosscheck`` script: the CLI, with Ctrl-C and SIGTERM handled from its first line."""

import os


def run() -> None:
    """Set up the process (spin count, signals), then run the CLI; exits with its status."""
    # torch's OpenMP threads spin for GOMP_SPINCOUNT iterations after each parallel region (default 300000,
    # about a millisecond) and take the cores XLA's threads need when a JAX step follows a torch step; on a
    # busy 2-core machine the default makes cifar10 several times slower.  libgomp reads it once, when torch
    # loads it: so here, before the CLI imports torch (a value the user set is kept).
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    from crosscheck.common import interrupt  # the standard library only

    # Until main runs, a signal ends the process at once: interrupting torch's or JAX's import can crash it.
    interrupt.install(at_once=True)  # crosscheck/__init__ did already, under python -m crosscheck: kept
    code = 130
    try:
        from crosscheck.cli import main

        code = main()
    except KeyboardInterrupt as err:
        interrupt.say(err)
    except SystemExit as err:  # argparse: --help, a usage error
        code = err.code
    interrupt.finish(code)


if __name__ == "__main__":
    run()
