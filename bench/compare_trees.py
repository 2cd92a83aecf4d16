"""Run one benchmark on two source trees alternately (A B B A ...), to compare a refactor with its base.

    python bench/compare_trees.py --old /tmp/oldtree --new . --rounds 2 -- fanout.py --nodes 100 1000

Each run uses its own tree's copy of the benchmark script, with that tree first on PYTHONPATH and
as the working directory (the editable install's finder comes after PYTHONPATH). The outputs are
printed one after the other, labelled, and written to --out if given: compare the figures side by
side, since both trees ran on the same machine in the same minutes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def run(tree: Path, script: str, args: list[str]) -> tuple[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(tree / "bench" / script), *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    took = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {script} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done.stdout, took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="the base tree (a git worktree of the old commit)")
    parser.add_argument("--new", type=Path, default=Path("."), help="the changed tree")
    parser.add_argument("--rounds", type=int, default=2, help="A B B A per round")
    parser.add_argument("--out", type=Path, help="write every labelled output here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...] (a file in bench/)")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark after --")
    script, rest = command[0], command[1:]
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    order = ["old", "new", "new", "old"] * args.rounds
    lines = [f"# {script} {' '.join(rest)}: order {' '.join(order)}"]
    for i, label in enumerate(order, 1):
        out, took = run(trees[label], script, rest)
        block = f"## run {i}: {label} ({trees[label]}), {took:.1f} s\n{out}"
        print(block, flush=True)
        lines.append(block)
    if args.out:
        args.out.write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
