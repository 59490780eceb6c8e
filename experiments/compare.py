"""Are two ``results.jsonl`` files the same results? ``python3 -m experiments.compare A B``.

Rows are matched by (method, seed, config_id) and compared on every field but the timings
(names ending in ``_seconds``, and ``phase_*`` resource records): a refactor that claims
"results unchanged" shows it with this command. Fields that only the newer file ``B`` has are
listed apart (``--allow-new-fields`` accepts them: a new record is not a changed result).
Exit 0 when the results agree, 1 when they differ, 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping

from experiments import results

_TIMING_PREFIXES = ("phase_",)
_MISSING = object()


def _is_timing(field: str) -> bool:
    return field.endswith("_seconds") or field.startswith(_TIMING_PREFIXES)


def _keyed(rows) -> dict:
    return {(r["method"], r["seed"], r["config_id"]): r for r in rows}


def compare_rows(old: list[Mapping[str, Any]], new: list[Mapping[str, Any]]) -> dict:
    """The differences between two lists of rows, by (method, seed, config_id).

    Returns ``{"compared": n, "differing": [(key, field, old, new)], "new_fields":
    {field, ...}, "only_old": [key], "only_new": [key]}``.
    """
    a, b = _keyed(old), _keyed(new)
    report = {"compared": 0, "differing": [], "new_fields": set(),
              "only_old": sorted(set(a) - set(b)), "only_new": sorted(set(b) - set(a))}
    for key in sorted(set(a) & set(b)):
        report["compared"] += 1
        for field in sorted(set(a[key]) | set(b[key])):
            if _is_timing(field):
                continue
            if field not in a[key]:
                report["new_fields"].add(field)
            elif a[key][field] != b[key].get(field, _MISSING):
                report["differing"].append((key, field, a[key][field], b[key].get(field)))
    return report



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m experiments.compare",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("old", help="the reference results.jsonl")
    parser.add_argument("new", help="the results.jsonl to check against it")
    parser.add_argument("--allow-new-fields", action="store_true",
                        help="fields only NEW has do not count as differences")
    args = parser.parse_args(argv)
    for path in (args.old, args.new):
        if not os.path.isfile(path):
            print(f"error: {path}: no such results file", file=sys.stderr)
            return 2
    try:
        old, new = results.load_rows(args.old), results.load_rows(args.new)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = compare_rows(old, new)
    for key, field, before, after in report["differing"]:
        print(f"{'/'.join(map(str, key))}: {field}: {before!r} -> {after!r}")
    for side in ("only_old", "only_new"):
        for key in report[side]:
            print(f"{'/'.join(map(str, key))}: only in {side[5:]}")
    if report["new_fields"]:
        print(f"fields only in new: {', '.join(sorted(report['new_fields']))}")
    print(f"{report['compared']} rows compared, {len(report['differing'])} differing fields")
    same = not (report["differing"] or report["only_old"] or report["only_new"]
                or (report["new_fields"] and not args.allow_new_fields))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
