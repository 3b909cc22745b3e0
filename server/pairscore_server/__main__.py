"""``python -m pairscore_server [serve] [flags]``: run the server.

The flags are those of ``pairscore serve`` (see ``--help``).
"""

from __future__ import annotations

import sys

from pairscore_server.main import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["serve"]:
        args = args[1:]
    sys.exit(main(args))
