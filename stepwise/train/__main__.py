"""``python -m stepwise.train``: see :mod:`stepwise.train.trainer`."""

import sys

from stepwise.train.trainer import main

sys.exit(main())
