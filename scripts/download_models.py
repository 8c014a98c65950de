"""Fetch, export or import models into the store; the same as `immich-aio models ...`.

python scripts/download_models.py clip --arch ViT-B-16
python scripts/download_models.py faces --pack buffalo_l
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from immich_aio.download.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
