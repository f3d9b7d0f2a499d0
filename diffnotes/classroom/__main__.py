"""``python -m diffnotes.classroom assign|grade`` (see diffnotes.classroom)."""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffnotes.classroom",
                                 description="Assign chapters' exercises and grade submissions "
                                 "(built on otter-grader).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("assign", help="chapter notebook(s) -> student notebooks + autograder")
    a.add_argument("chapters", nargs="+")
    a.add_argument("--out", default="dist")
    g = sub.add_parser("grade", help="grade a folder of submitted notebooks into a CSV")
    g.add_argument("assignments", help="the folder `assign` wrote (or one assignment in it)")
    g.add_argument("submissions", help="a folder of .ipynb files (searched recursively)")
    g.add_argument("--csv", default="grades.csv")
    g.add_argument("--timeout", type=float, default=60.0, help="wall seconds per exercise")
    g.add_argument("--memory", type=int, default=4096, help="MiB of address space per process")
    g.add_argument("--jobs", type=int, default=None, help="processes at once (default: CPUs)")
    g.add_argument("--user", default="nobody",
                   help="run submissions as this user when grading as root ('' to keep root)")
    g.add_argument("--engine", choices=["direct", "otter"], default="direct",
                   help="execute each exercise directly (fast) or with `otter run` (a kernel)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.cmd == "assign":
        from .assign import assign
        for m in assign(args.chapters, args.out):
            print(f"{m['assignment']}: {len(m['exercises'])} exercises -> {args.out}/"
                  f"{m['assignment']}/student/{m['assignment']}.ipynb and "
                  f"{args.out}/{m['assignment']}/autograder/")
    else:
        import os
        from .grade import grade, table
        from .sandbox import Limits, privilege_drop
        if os.geteuid() == 0 and not privilege_drop(args.user or None):
            print(f"note: grading as root and submissions cannot run as {args.user or 'root'!r} "
                  f"here; they run as root (see book/instructors.md, the container option)")
        res = grade(args.assignments, args.submissions, args.csv,
                    limits=Limits(timeout_s=args.timeout, memory_mb=args.memory,
                                  user=args.user or None), jobs=args.jobs, engine=args.engine)
        print(table(res))
        print(f"wrote {args.csv} and its _properties.csv ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
