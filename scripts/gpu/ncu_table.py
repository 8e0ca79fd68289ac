#!/usr/bin/env python3
"""Kernel time table from `ncu --metrics gpu__time_duration.sum --print-summary per-kernel`.

    python3 scripts/gpu/ncu_table.py NCU_OUTPUT.txt [--top N]

Prints the total kernel time and the kernels by total time (launches x mean duration),
largest first, as a Markdown table: ms, share, launches, mean, name (shortened), grid.
"""
import argparse
import re
import sys

UNITS = {"ns": 1e-9, "nsecond": 1e-9, "us": 1e-6, "usecond": 1e-6, "ms": 1e-3,
         "msecond": 1e-3, "s": 1.0, "second": 1.0}
HEAD = re.compile(r"^\s*(.+?) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\), "
                  r"(?:Context \d+, Stream \d+, )?Device \d+, CC [\d.]+, Invocations (\d+)\s*$")
METRIC = re.compile(r"gpu__time_duration\.sum\s+(\w+)\s+([\d.,]+)\s+([\d.,]+)\s+([\d.,]+)")


def parse(text):
    rows, cur = [], None
    for line in text.splitlines():
        m = HEAD.match(line)
        if m:
            cur = (m.group(1), "x".join(m.group(i) for i in (2, 3, 4)), int(m.group(8)))
            continue
        t = METRIC.search(line)
        if t and cur:
            unit = UNITS.get(t.group(1))
            if unit is None:
                sys.exit(f"unknown time unit {t.group(1)!r}")
            mean = float(t.group(4).replace(",", "")) * unit
            name, grid, n = cur
            rows.append((mean * n, n, mean, name, grid))
            cur = None
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    rows = sorted(parse(open(a.path, encoding="utf-8", errors="replace").read()), reverse=True)
    if not rows:
        sys.exit(f"{a.path}: no per-kernel summary with gpu__time_duration.sum found")
    total = sum(r[0] for r in rows)
    print(f"total kernel time {total * 1e3:.1f} ms over {sum(r[1] for r in rows)} launches\n")
    print("| ms | share | launches | mean µs | kernel | grid |")
    print("|---|---|---|---|---|---|")
    for tot, n, mean, name, grid in rows[: a.top]:
        short = name if len(name) <= 70 else name[:67] + "..."
        print(f"| {tot * 1e3:.2f} | {100 * tot / total:.1f}% | {n} | {mean * 1e6:.1f} | "
              f"{short.replace('|', '/')} | {grid} |")


if __name__ == "__main__":
    main()
