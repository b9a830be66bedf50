"""One table of an FP8 device run: each new option against the default it would replace (issue 18).

Reads what the device fragment wrote: profile_fp8.json (decode steps of the flash8 model per mode and batch:
fp8 = the defaults, fp8-dec / fp8-decqh = the MoE decode path) and bench_fp8.json (the MoE layer alone,
--moe-sweep rows: auto = the defaults, other tags = options, err ref = against the reference math).
Prints | what | T or B | default | option | option / default time | err |, a missing file or row as '-'.

    python3 scripts/fp8_options_table.py --profile $OUT/fp8/profile_fp8.json --bench $OUT/fp8/bench_fp8.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _load(path):
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def profile_rows(report) -> list:
    """(what, batch, default ms, option name, option ms, check) per option mode and batch of profile_fp8.json."""
    out = []
    modes = report.get("modes", {}) if report else {}
    batches = report.get("batch", []) if report else []
    for b in batches:
        key = lambda m: m if len(batches) == 1 else f"{m} B={b}"        # noqa: E731  (profile_fp8's keys)
        base = modes.get(key("fp8"), {})
        for opt in ("fp8-dec", "fp8-decqh"):
            r = modes.get(key(opt))
            if r is None:
                continue
            err = r.get("check", {}).get("moe.experts")
            out.append((f"flash8 decode step ms, {opt}", f"B={b}", base.get("step_ms"), r.get("step_ms"),
                        None if err is None else f"experts {err:.1e}"))
    return out


def bench_rows(report) -> list:
    """(what, T, default us, option us, err ref) per --moe-sweep option row of bench_fp8.json."""
    rows = [r for r in (report or {}).get("rows", []) if r.get("kind") == "moe-sweep"]
    auto = {r["T"]: r.get("us") for r in rows if r["method"].endswith(" auto")}
    out = []
    for r in rows:
        if r["method"].endswith(" auto"):
            continue
        err = r.get("err_ref")
        out.append((f"MoE layer us, {r['method'].split(' ', 1)[1]}", f"T={r['T']}", auto.get(r["T"]), r.get("us"),
                    r.get("error") or (None if err is None else f"ref {err:.1e}")))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", help="profile_fp8.json of the run")
    p.add_argument("--bench", help="bench_fp8.json of the run")
    args = p.parse_args(argv)
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"                  # noqa: E731
    print("| what | size | default | option | option / default | check |\n|---|---|---|---|---|---|")
    for what, size, base, opt, err in profile_rows(_load(args.profile)) + bench_rows(_load(args.bench)):
        ratio = opt / base if base and opt else None
        print(f"| {what} | {size} | {f(base)} | {f(opt)} | {f(ratio, 3)} | {err or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
