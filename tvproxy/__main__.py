"""``python -m tvproxy`` is the ``tvproxy`` command."""

import sys

from tvproxy.cli import main

if __name__ == "__main__":
    sys.exit(main())
