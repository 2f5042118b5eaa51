"""Write (or, with --check, verify) the tables in docs/ that are generated from the code.

Each generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``; the
text between them is replaced by what the code says now, so the docs cannot drift from it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def invariants_table() -> str:
    from pytest_causal_lm.registry import markdown_table

    return markdown_table()


def options_table() -> str:
    from pytest_causal_lm.settings import OPTIONS

    rows = ["| option | environment / ini key | meaning and default |", "|---|---|---|"]
    for spec in OPTIONS:
        option = spec.option + (f"={spec.metavar}" if spec.metavar else "")
        repeat = " (repeatable)" if spec.multiple else ""
        rows.append(f"| `{option}`{repeat} | `{spec.env}` / `{spec.ini}` | {spec.help} |")
    return "\n".join(rows)


def api_list() -> str:
    import pytest_causal_lm as clm

    rows = []
    for name in sorted(clm.__all__, key=str.lower):
        value = getattr(clm, name)
        own = value.__doc__ if callable(value) or isinstance(value, type) else None  # not dict's or str's
        summary = " ".join((own or "").strip().split("\n\n")[0].split())
        rows.append(f"- `{name}`: {summary}" if summary else f"- `{name}`")
    return "\n".join(rows)


GENERATED: dict[str, Callable[[], str]] = {"invariants": invariants_table, "options": options_table, "api": api_list}
_BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def refreshed(text: str) -> str:
    return _BLOCK.sub(lambda m: m[1] + GENERATED[m[2]]() + "\n" + m[4], text)


def main(check: bool) -> int:
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        new = refreshed(text)
        if new != text:
            stale.append(page.name)
            if not check:
                page.write_text(new, encoding="utf-8")
    if stale and check:
        print(f"generated tables out of date in {', '.join(stale)}: run python scripts/docs_tables.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(check="--check" in sys.argv))
