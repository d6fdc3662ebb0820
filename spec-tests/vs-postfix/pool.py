#!/usr/bin/env python3
"""Medians over the rounds of several comparison runs, taken together.

One run of compare.py gives three interleaved rounds per size; the ratio
of its medians moves by a few tenths between runs on a shared machine.
This pools the rounds of the result directories given (each one a
`--results` of run.sh) and prints, per size, the pooled medians and their
ratios, and the lowest ratio of delivered msgs/s within one round.

  spec-tests/vs-postfix/pool.py /var/lib/mta-vs-postfix/results/{a,b,c}
"""
import json
import os
import statistics
import sys


def main(dirs):
    if not dirs:
        raise SystemExit("usage: pool.py RESULTS_DIR... (directories that run.sh --results wrote)")
    pooled = {}
    for d in dirs:
        path = os.path.join(d, "results.json")
        try:
            with open(path) as fh:
                results = json.load(fh)
        except OSError as e:
            raise SystemExit(f"{path}: {e.strerror}; is {d} a finished run's --results directory?")
        for size, sides in results.items():
            for side, runs in sides.items():
                pooled.setdefault(int(size), {}).setdefault(side, []).extend(runs)

    def med(runs, key):
        return statistics.median(key(r) for r in runs)

    rate = lambda r: r["delivery"]["delivered_per_second"]  # noqa: E731
    cpu = lambda r: r["server_cpu_ms_per_message"]  # noqa: E731
    p99 = lambda r: r["transaction_p99_ms"]  # noqa: E731
    print(f"{len(dirs)} run(s): " + ", ".join(os.path.basename(d.rstrip('/')) for d in dirs))
    print("| size | rounds | delivered msgs/s, mta / Postfix | CPU per message, Postfix / mta "
          "| p99 time to 250, Postfix / mta | lowest rate ratio in a round |")
    print("|---|---|---|---|---|---|")
    for size in sorted(pooled):
        mta, pf = pooled[size]["mta"], pooled[size]["postfix"]
        rounds = min(len(mta), len(pf))
        lowest = min(rate(a) / rate(b) for a, b in zip(mta, pf))
        print(f"| {size} KiB | {rounds} "
              f"| {med(mta, rate):,.0f} / {med(pf, rate):,.0f} = **{med(mta, rate) / med(pf, rate):.2f}×** "
              f"| {med(pf, cpu):.2f} / {med(mta, cpu):.2f} ms = **{med(pf, cpu) / med(mta, cpu):.2f}×** "
              f"| {med(pf, p99):.1f} / {med(mta, p99):.1f} ms = **{med(pf, p99) / med(mta, p99):.2f}×** "
              f"| {lowest:.2f}× |")


if __name__ == "__main__":
    main(sys.argv[1:])
