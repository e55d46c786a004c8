"""Run one benchmark trial in this (fresh) interpreter: ``python -m bench.child MOD:FN JSON``.

The function gets the JSON parameters and returns a dict; this prints it on one line
with the process's peak RSS added, for :func:`bench.core.run_child` to read.
"""

from __future__ import annotations

import importlib
import json
import sys

from bench.core import RESULT_PREFIX, peak_rss_mb


def main(argv: list[str]) -> int:
    """Import the target, call it, print the result line."""
    target, raw = argv
    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = dict(function(json.loads(raw)))
    result.setdefault("peak_rss_mb", peak_rss_mb())
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
