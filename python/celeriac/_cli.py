"""The ``celeriac`` console script: hands the command line to the Rust worker."""

import signal
import sys


def main():
    from celeriac import _native

    # The worker installs its own signal handlers. Python's SIGINT handler
    # would only raise KeyboardInterrupt once control is back in Python,
    # after the worker has already drained: let the worker own the signal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.stdout.flush()
    code = _native.main(sys.argv)
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
