"""`python -m immich_aio` starts the server (and `python -m immich_aio models ...` manages models)."""

from immich_aio.cli import main

raise SystemExit(main())
