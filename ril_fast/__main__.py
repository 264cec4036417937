"""`python -m ril_fast`: versions, devices, and which kernel backend each op would use, and why
(``ril-fast info``). With arguments it is the ``ril-fast`` command: ``python -m ril_fast train ...``."""

from __future__ import annotations

import sys

from ril_fast.cli import info
from ril_fast.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    if argv:
        return cli(argv)
    info()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
