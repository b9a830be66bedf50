"""What an XLA kernel seen in a profile computes: its fusion instruction and fused computation in an HLO dump.

A device trace names XLA's kernels after their fusions (loop_add_fusion_9, input_reduce_fusion_38, ...); the names
are per compiled module. Run the program once with an HLO dump, e.g.

    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=.*step_fn.*" python3 scripts/profile_fp8.py ...

then, per after-optimizations module whose text contains every --module-contains string, this prints each named
fusion's instruction (shapes, operands, the JAX op name in its metadata) and the first lines of the computation it
calls:

    python3 scripts/hlo_fusion.py --dump /tmp/dump --names loop_add_fusion_9,loop_convert_fusion_7 \
        --module-contains prefill_kernel,gate_up_fp8 > $OUT/hlo_fusions.txt
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys


def computations(text: str) -> dict[str, list[str]]:
    """The module's computations by name: their lines, header first."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
        if m and line.rstrip().endswith("{") and not line.startswith(" "):
            name = m.group(1)
            out[name] = [line]
        elif name is not None:
            out[name].append(line)
            if line.startswith("}"):
                name = None
    return out


def stack_frames(text: str) -> dict[int, tuple[str, int, int]]:
    """The module's StackFrames table: frame id -> ("file:line (function)", parent frame id)."""
    def table(title):
        m = re.search(rf"^{title}\n((?:\d+ .*\n)*)", text, re.M)
        return dict((int(k), v) for k, v in re.findall(r"^(\d+) (.*)$", m.group(1), re.M)) if m else {}
    files = {k: v.strip('"') for k, v in table("FileNames").items()}
    funcs = {k: v.strip('"') for k, v in table("FunctionNames").items()}
    field = lambda v, f: int(re.search(rf"{f}=(\d+)", v).group(1))                  # noqa: E731
    locs = {k: f"{os.path.basename(files.get(field(v, 'file_name_id'), '?'))}:{field(v, 'line')} "
               f"({funcs.get(field(v, 'function_name_id'), '?')})" for k, v in table("FileLocations").items()}
    return {k: (locs.get(field(v, "file_location_id"), "?"), field(v, "parent_frame_id"))
            for k, v in table("StackFrames").items()}


def where(frames, line: str, depth: int) -> str:
    """The source of an HLO line: its stack frame and up to depth - 1 callers, innermost first."""
    m = re.search(r"stack_frame_id=(\d+)", line)
    out, fid = [], int(m.group(1)) if m else 0
    while fid in frames and len(out) < depth:
        loc, parent = frames[fid]
        out.append(loc)
        fid = parent if parent != fid else 0
    return " <- ".join(out)


def describe(text: str, names: list[str], width: int, body_lines: int) -> list[str]:
    comps, frames = computations(text), stack_frames(text)
    lines = []
    for n in names:
        # a kernel is named after its instruction with "." as "_" (loop_add_fusion.9 -> loop_add_fusion_9)
        alt = "(?:" + "|".join(re.escape(c) for c in {n, re.sub(r"_(\d+)$", r".\1", n)}) + ")"
        hit = re.search(rf"^\s*(?:ROOT )?%{alt} = .*$", text, re.M)
        if not hit:
            lines.append(f"{n}: not in this module")
            continue
        inst = hit.group(0).strip()
        lines.append(f"{n}: {inst[:width]}")
        lines.append(f"  from {where(frames, inst, 6)}")
        called = re.search(r"calls=%?([\w.\-]+)", inst)
        body = comps.get(called.group(1), []) if called else []
        for b in body[1:1 + body_lines]:
            src = where(frames, b, 1)
            lines.append(f"    {b.strip()[:width]}" + (f"  @ {src}" if src else ""))
        if len(body) > 1 + body_lines:
            lines.append(f"    ... {len(body) - 1 - body_lines} more lines")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dump", required=True, help="the --xla_dump_to directory")
    p.add_argument("--names", required=True, help="comma list of fusion (kernel) names from a profile")
    p.add_argument("--module-contains", default="",
                   help="comma list of strings a module's text must all contain (default: every module)")
    p.add_argument("--width", type=int, default=400, help="characters printed per HLO line (default 400)")
    p.add_argument("--body-lines", type=int, default=30, help="lines of each fused computation (default 30)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.dump):
        p.error(f"--dump {args.dump!r} is not a directory")
    names = [n for n in args.names.split(",") if n]
    need = [s for s in args.module_contains.split(",") if s]
    files = sorted(glob.glob(os.path.join(args.dump, "*after_optimizations.txt")))
    found = 0
    for f in files:
        with open(f) as fh:
            text = fh.read()
        if not all(s in text for s in need):
            continue
        found += 1
        print(f"== {os.path.basename(f)}")
        print("\n".join(describe(text, names, args.width, args.body_lines)))
    if not found:
        print(f"no after-optimizations module in {args.dump} contains all of {need} ({len(files)} modules)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
