"""`python -m bridge` is `passerelle`."""

import sys

from bridge.cli import main

sys.exit(main())
