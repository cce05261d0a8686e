"""The published benchmark: ``python -m benchmarks.run [--data-dir DIR] [jaxnet bench options]``.

Runs ``jaxnet bench --full --device cpu --out docs/`` (the published page is the CPU's; pass
``--device cuda`` after it for a GPU run): every tutorial model and batch size
of the published table in every variant (PyTorch eager with and without
flushed denormals, torch.compile, jaxnet jit, jaxnet scan), the first-step and
memory probes, and time to accuracy on MNIST; then rewrites
``docs/static_vs_dynamic.md``, ``docs/bench.json``, ``docs/bench.md`` and the
charts. About 12-15 minutes on the 2-core development machine. Pass
``--data-dir`` (or set ``$JAXNET_DATA_DIR``) to the folder holding the full
MNIST (``mnist/``); without it the time-to-accuracy rows run on the 6,000-image
sample shipped with jaxnet and say so.
"""

from __future__ import annotations

import pathlib
import sys

from jaxnet.bench.cli import main as bench_main

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def main(argv: list[str] | None = None) -> int:
    """Runs the full benchmark into ``docs/``; extra arguments go to ``jaxnet bench``."""
    extra = sys.argv[1:] if argv is None else list(argv)
    return bench_main(["bench", "--full", "--device", "cpu", "--out", str(DOCS), *extra])


if __name__ == "__main__":
    sys.exit(main())
