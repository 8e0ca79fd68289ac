"""Steps two benchmark processes in turn: distil's (benches/encoder_step.rs) and PyTorch's
(benches/torch_step.py), both started with --lockstep, a burst of BURST steps of one, then a
burst of the other, for PAIRS pairs (which side goes first alternates), so that both sides of
a pair see the machine in the same state. Where rounds of whole runs compare minutes apart
(compare.sh without LOCKSTEP), a pair compares seconds apart: the host's slow and fast phases,
which move both sides' step times by 5-15% on the shared machines this was written on, hit
both sides of a pair alike.

    lockstep.py OUT PAIRS BURST PAUSE -- distil command... --vs-- pytorch command...

Both processes hold their model in memory throughout; only one computes at a time. Before each
burst the other side is given PAUSE seconds to go quiet (distil's rayon workers spin for 50 ms
after a step, PyTorch's OpenMP workers for a while too). A side's time in a pair is the median
of its burst's steps after the first: the first step after the pause runs on cold caches and
sleeping threads, which cost PyTorch more than distil (with bursts of one, base forward and
distillation steps were 6-8% slower on PyTorch's side than back to back, and -2 to +3% on distil's).
Writes OUT/distil.jsonl and
OUT/pytorch.jsonl (each process's summary line) and OUT/lockstep.json (the pairs), and prints
the per-pair ratio of PyTorch's step time to distil's: its median and spread, and the ratio of
the two medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time


def read_json(p: subprocess.Popen, name: str) -> dict:
    """The next JSON line on p's stdout (other lines are passed through to stderr)."""
    while True:
        line = p.stdout.readline()
        if not line:
            raise SystemExit(f"lockstep: {name} ended early (exit status {p.wait()})")
        try:
            v = json.loads(line)
        except ValueError:
            sys.stderr.write(line)
            continue
        if isinstance(v, dict):
            return v


def main() -> int:
    argv = sys.argv[1:]
    if len(argv) < 7 or argv[4] != "--" or "--vs--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        out, pairs, burst, pause = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    except ValueError:
        print(f"lockstep: PAIRS and BURST must be integers and PAUSE a number, not {argv[1:4]}",
              file=sys.stderr)
        return 2
    cut = argv.index("--vs--")
    cmds = {"distil": argv[5:cut], "pytorch": argv[cut + 1:]}
    if pairs < 1 or burst < 2 or not cmds["distil"] or not cmds["pytorch"]:
        print("lockstep: PAIRS must be at least 1, BURST at least 2, and both commands given",
              file=sys.stderr)
        return 2
    procs = {k: subprocess.Popen(c, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
             for k, c in cmds.items()}
    try:
        for k, p in procs.items():
            if not read_json(p, k).get("ready"):
                raise SystemExit(f"lockstep: {k} did not say it was ready")
        steps = []
        for i in range(pairs):
            t = {}
            for k in (("distil", "pytorch") if i % 2 == 0 else ("pytorch", "distil")):
                time.sleep(pause)
                procs[k].stdin.write("step\n" * burst)
                procs[k].stdin.flush()
                times = [read_json(procs[k], k)["step_s"] for _ in range(burst)]
                t[k] = statistics.median(times[1:])
            steps.append(t)
            print(f"pair {i + 1}/{pairs}: distil {t['distil']:.3f} s, pytorch {t['pytorch']:.3f} s, "
                  f"{t['pytorch'] / t['distil']:.2f}x", file=sys.stderr)
        summaries = {}
        for k, p in procs.items():
            p.stdin.close()
            summaries[k] = read_json(p, k)
            if p.wait() != 0:
                raise SystemExit(f"lockstep: {k} exited with status {p.returncode}")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for k, s in summaries.items():
        with open(f"{out}/{k}.jsonl", "w") as f:
            f.write(json.dumps(s) + "\n")
    ratios = [t["pytorch"] / t["distil"] for t in steps]
    with open(f"{out}/lockstep.json", "w") as f:
        json.dump({"pairs": steps, "ratios": ratios}, f)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    med = {k: statistics.median(t[k] for t in steps) for k in ("distil", "pytorch")}
    print(f"lockstep: {pairs} pairs; distil / pytorch tokens/s per pair: median {statistics.median(ratios):.3f}x "
          f"(quartiles {q[0]:.3f}-{q[2]:.3f}, range {min(ratios):.3f}-{max(ratios):.3f}; "
          f"{sum(r >= 1.2 for r in ratios)} of {pairs} pairs at 1.2x or more); "
          f"ratio of the median steps {med['pytorch'] / med['distil']:.3f}x "
          f"({med['distil']:.3f} s vs {med['pytorch']:.3f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
