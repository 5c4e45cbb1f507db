"""``python -m cairn``: the ``cairn`` console command, for environments where the script is not on ``PATH``."""

import sys

from cairn.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
