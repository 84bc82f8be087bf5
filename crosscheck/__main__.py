import signal
import sys

# Importing torch, JAX and flax takes seconds: a Ctrl-C then is an interrupt too.  The
# handler also records it, in case Python swallowed the exception inside a gc callback.
_early = []


def _record(signum, frame):
    _early.append(signum)
    raise KeyboardInterrupt


signal.signal(signal.SIGINT, _record)
try:
    from crosscheck.cli import main
    if _early:
        raise KeyboardInterrupt
except KeyboardInterrupt:
    print("interrupted (no report written)", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
