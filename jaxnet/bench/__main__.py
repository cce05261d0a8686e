"""``python -m jaxnet.bench bench ...``: the benchmark command without the rest of the CLI."""

import sys

from jaxnet.bench.cli import main

sys.exit(main())
