"""
The toy study's throughput: arm-seeds per hour trained one at a time (one process, torch's threads on every core)
and side by side (train.py --jobs N: N processes, one thread each), in one run of this script, on the same cached
bases; and whether both give the same rows (they must: --jobs changes where an arm-seed runs, not what it computes).

    python benchmarks/study_speed.py                       # 4 arms x 2 seeds, one update seed per regime
    python benchmarks/study_speed.py --seeds 1 --jobs 2 --out benchmarks/study-speed.json

Each side is a fresh `python train.py` process, timed from start to end (bases cached: it builds them first if
they are not); the order alternates over --repeats. Another process on the same cores distorts everything: run it
on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_study(out: Path, arms: str, seeds: int, jobs: int) -> float:
    """One toy study in a fresh process; its wall-clock seconds."""
    t0 = time.time()
    subprocess.run([sys.executable, "train.py", "--arms", arms, "--seeds", str(seeds), "--jobs", str(jobs),
                    "--out", str(out), "--overwrite"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="plain,drop,both,lora_dropout")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="side by side: processes (default: cores)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", help="write the figures here as JSON")
    args = p.parse_args()
    subprocess.run([sys.executable, "-c", "import toy; [toy.build_bases(0, regime=r) for r in toy.REGIMES]"],
                   cwd=ROOT, check=True)
    arm_seeds = len(args.arms.split(",")) * args.seeds
    times = {1: [], args.jobs: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for jobs in ((1, args.jobs) if i % 2 == 0 else (args.jobs, 1)):
                times[jobs].append(run_study(Path(tmp) / f"jobs{jobs}", args.arms, args.seeds, jobs))
                print(f"--jobs {jobs}: {times[jobs][-1]:.0f} s for {arm_seeds} arm-seeds", flush=True)
        rows = [json.loads((Path(tmp) / f"jobs{j}" / "results.json").read_text())["rows"] for j in times]
    same = rows[0] == rows[1]
    per_hour = {j: 3600 * arm_seeds / min(t) for j, t in times.items()}
    print(f"arm-seeds per hour (the study's whole run, drift and tables included): one at a time {per_hour[1]:.0f}, "
          f"{args.jobs} side by side {per_hour[args.jobs]:.0f}: x{per_hour[args.jobs] / per_hour[1]:.2f}; "
          f"rows identical: {same}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                              "cores": os.cpu_count(), "arms": args.arms, "seeds": args.seeds,
                                              "seconds": times, "arm_seeds_per_hour": per_hour, "rows_identical": same},
                                             indent=2))
    if not same:
        sys.exit("the rows differ between one at a time and side by side")


if __name__ == "__main__":
    main()
