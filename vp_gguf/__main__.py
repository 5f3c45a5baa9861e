"""``python -m vp_gguf``: the ``vp-gguf`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
