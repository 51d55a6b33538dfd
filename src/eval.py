"""Evaluation entry point: ``python src/eval.py --checkpoint experiments/run01 --dataset zsre --output OUT.json``.

The same as ``icelora eval``; see ``icelora eval --help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from icelora.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
