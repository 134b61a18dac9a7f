"""``python -m train``: see :mod:`train.trainer`."""

import sys

from train.trainer import main

sys.exit(main())
