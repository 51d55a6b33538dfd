"""Training entry point: ``python src/train.py --config configs/train_config.yaml --output_dir experiments/run01``.

The same as ``icelora train``; see ``icelora train --help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from icelora.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
