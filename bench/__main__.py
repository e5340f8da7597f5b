"""``python -m bench``: see ``python -m bench --help`` and ``cli.py``."""
import signal
import sys

from .cli import main

if __name__ == "__main__":
    # Stopped by SIGTERM (`timeout`, as bench/gpu_run.sh does): end like Ctrl-C, with a traceback that shows
    # where it was. The results files already hold every finished case (they are written after each one).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
