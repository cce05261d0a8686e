"""``python -m jaxnet``: see :mod:`jaxnet.cli`."""

import sys

from jaxnet.cli import main

sys.exit(main())
