"""``python -m spotlighter.results``."""

from .cli import main

raise SystemExit(main())
