"""``python -m xct._native build``: compile the native projector kernels for this machine."""

import sys

from xct._native import main

sys.exit(main())
