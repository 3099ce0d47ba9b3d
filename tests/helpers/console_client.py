"""A training script that writes to its console every way a real one does.

Prints lines, writes to stderr, writes a line in parts, draws a tqdm bar (carriage
returns), forks a child that prints (a DataLoader worker), prints `--flood` numbered
lines, and ends on a line without a newline. It prints nothing else, so that its
stdout and stderr bytes can be compared between console="wrap" and console="off".
"""

from __future__ import annotations

import argparse
import os
import sys

import trackd

BAR_FORMAT = "{l_bar}{bar:10}| {n_fmt}/{total_fmt}"  # no rates or times: the same every run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--console", default="wrap")
    parser.add_argument("--mode", default="online")
    parser.add_argument("--flood", type=int, default=0)
    parser.add_argument("--no-fork", action="store_true")
    args = parser.parse_args()

    from tqdm import tqdm

    run = trackd.init(project="console", name=args.name, console=args.console, mode=args.mode)
    print("hello 0")
    print("hello", 1)
    sys.stderr.write("an error line\n")
    sys.stdout.write("part-a ")
    sys.stdout.write("part-b")
    sys.stdout.write(" part-c\nnext line\n")
    for step in tqdm(range(40), file=sys.stderr, bar_format=BAR_FORMAT, mininterval=0):
        run.log({"step": step})
    print("after the bar")
    if not args.no_fork:
        sys.stdout.flush()  # else the child inherits unflushed bytes and writes them again
        child = os.fork()
        if child == 0:
            print("from the child")
            run.finish()
            sys.stdout.flush()
            os._exit(0)
        os.waitpid(child, 0)
    print("after the child")
    for index in range(args.flood):
        print(f"flood {index}")
    sys.stdout.write("no newline at the end")
    run.finish()


if __name__ == "__main__":
    main()
