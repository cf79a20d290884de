"""Output for people (aligned tables, key: value) and for scripts (`--json`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any, TextIO


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """Render rows as an aligned text table for people."""

    def cell(v: Any) -> str:
        if isinstance(v, dict):
            return ",".join(f"{k}={x}" for k, x in v.items())
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        return str(v)

    grid = [[c for c in columns]] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in grid]
    return "\n".join(lines)


def show(args: argparse.Namespace, data: Any, columns: Sequence[str] | None = None, file: TextIO | None = None) -> None:
    """Print `data` for people or, with --json, as JSON; to `file` (default stdout)."""
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False), file=file)
        return
    if isinstance(data, dict) and "items" in data and columns:
        print(table(data["items"], columns), file=file)
        print(f"({len(data['items'])} of {data['total']})", file=file)
    elif isinstance(data, list) and columns:
        print(table(data, columns), file=file)
    elif isinstance(data, dict):
        width = max((len(k) for k in data), default=0)
        for k, v in data.items():
            print(f"{k.ljust(width)}  {json.dumps(v) if isinstance(v, dict | list) else v}", file=file)
    else:
        print(data, file=file)
