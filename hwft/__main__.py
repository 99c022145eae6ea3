"""``python -m hwft``: the hwft command (how launchers such as torchrun start its workers)."""

import sys

from hwft.cli import main

sys.exit(main())
