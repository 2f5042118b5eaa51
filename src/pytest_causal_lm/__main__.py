"""``python -m pytest_causal_lm merge r1.json r2.json ...``: one verdict from the JSON reports of several runs."""

from .report import main

raise SystemExit(main())
