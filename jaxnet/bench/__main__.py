"""``python -m jaxnet.bench bench ...``: the benchmark command without the rest of the CLI."""

import sys

from jaxnet.cli.bench import main

sys.exit(main())
