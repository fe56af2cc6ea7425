"""How long the command line takes before it does anything: `counterattack --help` against `import torch`.

Each command runs in a fresh process (after one run that writes the options cache, as any first
command after installing or changing the code does), timed over repeats; the baseline is importing
torch alone, which every computing command needs. Ends with one line:

    RATIOS help/import_torch=R help_seconds=S target: help under 1 s

Usage::

    python benchmarks/bench_cli.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    help_command = [sys.executable, "-m", "counterattack", "eval", "--help"]
    subprocess.run(help_command, check=True, capture_output=True)  # the options cache, once
    torch_seconds = seconds([sys.executable, "-c", "import torch"], args.repeats)
    help_seconds = seconds(help_command, args.repeats)
    top_seconds = seconds([sys.executable, "-m", "counterattack", "--help"], args.repeats)
    print(f"import torch: {torch_seconds:.2f} s; counterattack --help: {top_seconds:.2f} s; "
          f"counterattack eval --help: {help_seconds:.2f} s (medians of {args.repeats})")
    print(f"RATIOS help/import_torch={help_seconds / torch_seconds:.2f} help_seconds={help_seconds:.2f} "
          "target: help under 1 s")


if __name__ == "__main__":
    main()
