"""A benchmark's result: printed as JSON, and written to ``path`` too when one is given (shared by the benchmarks)."""

from __future__ import annotations

import json


def emit_json(result: dict, path: str | None) -> dict:
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return result
