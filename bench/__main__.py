"""``python -m bench``: see ``python -m bench --help``.

On a machine without CUDA, ``cli.main`` sets ``TRITON_INTERPRET=1`` before anything imports fusedad, so
the real Triton kernels run through Triton's interpreter (correctness only, tiny shapes).
"""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
