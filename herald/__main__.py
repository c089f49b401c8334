"""``python -P -m herald``: how herald starts its own child processes (never the cwd on sys.path)."""

from herald.cli import main

raise SystemExit(main())
