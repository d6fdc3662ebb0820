#!/usr/bin/env python3
"""The same load against the mta and against Postfix + OpenDKIM, interleaved.

Started by run.sh, which installs, configures and starts Postfix and
OpenDKIM and stops them afterwards; this program only drives the load and
reports. Every run is one invocation of our benchmark client
(`bench`, spec-tests/src/bin/bench.rs) with the same client, message,
connection count and counting sink (listening on --sink) for both sides:

  mta:     bench --deliver --sink ADDR --dkim rsa   (a fresh daemon, relaying to the sink)
  Postfix: bench --server ADDR --sink ADDR --pid MASTER --pid OPENDKIM --queue-dir ...

Per size: one warm-up round that is thrown away, then --runs rounds of
(mta, Postfix[, mta with Ed25519]). Each run also warms up inside bench
(--warmup messages, delivered before measuring). Delivered messages from
every run are kept (--sample) and their DKIM signatures verified with
dkimpy, against the public keys of both signers (no DNS).

The machine may be shared: before each run this waits (bounded) for it to
be idle, and every run records the CPU that other processes used during it.
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

CLK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------- machine CPU
def machine_busy():
    """Busy CPU seconds of the whole machine so far (steal and iowait excluded)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = f[:7]
    return (user + nice + system + irq + softirq) / CLK


def wait_idle(max_wait, threshold):
    """Waits up to max_wait s for a second with fewer than threshold busy cores."""
    deadline = time.monotonic() + max_wait
    while True:
        b0 = machine_busy()
        time.sleep(1)
        busy = machine_busy() - b0
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def tree_cpu(roots):
    """CPU seconds of the process trees under roots (live processes and the
    children they reaped), as bench measures them."""
    procs = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            raw = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        f = raw[raw.rindex(")") + 2:].split()
        procs[int(p)] = (int(f[1]), sum(int(x) for x in f[11:15]) / CLK)
    kids = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    seen, todo, total = set(), [r for r in roots if r in procs], 0.0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += procs[pid][1]
        todo.extend(kids.get(pid, ()))
    return total


def read_pid(path):
    with open(path) as fh:
        return int(fh.read().split()[0])


# ------------------------------------------------------------- Postfix log
STATUS_RE = re.compile(r" status=(\w+)")


def postfix_statuses(path, offset, expect, wait=10.0):
    """status=... counts in the Postfix log after offset; waits (bounded) for
    postlogd to write `expect` of them."""
    deadline = time.monotonic() + wait
    while True:
        counts = {}
        with open(path, "rb") as fh:
            fh.seek(offset)
            for line in fh:
                m = STATUS_RE.search(line.decode("utf-8", "replace"))
                if m:
                    counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        if sum(counts.values()) >= expect or time.monotonic() >= deadline:
            return counts
        time.sleep(0.2)


# ------------------------------------------------------------- DKIM
def read_records(path):
    records = {}
    with open(path) as fh:
        for line in fh:
            if line.strip():
                name, value = line.rstrip("\n").split("\t", 1)
                records[name.lower().rstrip(".")] = value
    return records


def verify_samples(sample_dir, records, algorithm):
    """(verified, total, failures) for the messages kept in sample_dir."""
    import dkim

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        value = records.get(name.lower().rstrip("."))
        return value.encode() if value else None

    files = sorted(f for f in os.listdir(sample_dir) if f.endswith(".eml"))
    ok, failures = 0, []
    for f in files:
        data = open(os.path.join(sample_dir, f), "rb").read()
        sig = re.search(rb"^DKIM-Signature:(.*?)\r\n(?![ \t])", data, re.S | re.M)
        alg = re.search(rb"a=([\w-]+)", sig.group(1)).group(1).decode() if sig else None
        try:
            good = dkim.verify(data, dnsfunc=dnsfunc)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            good = False
            failures.append(f"{f}: {e}")
        if good and alg == algorithm:
            ok += 1
        elif good:
            failures.append(f"{f}: signed with {alg}, expected {algorithm}")
        elif not failures or not failures[-1].startswith(f):
            failures.append(f"{f}: no valid signature")
    return ok, len(files), failures


# ------------------------------------------------------------- one run
def run_bench(args, side, size, messages, warmup, label):
    out_dir = os.path.join(args.results, f"{size}k", f"{label}-{side}")
    sample_dir = os.path.join(out_dir, "sample")
    os.makedirs(out_dir, exist_ok=True)
    common = ["--no-tls", "--size-kb", str(size), "--messages", str(messages),
              "--warmup", str(warmup), "--connections", str(args.connections),
              "--sink", args.sink, "--sample", str(args.sample),
              "--sample-dir", sample_dir, "--json"]
    pids = []
    if side == "postfix":
        pids = [read_pid(args.postfix_pidfile), read_pid(args.opendkim_pidfile)]
        cmd = [args.bench, "--server", args.server] + common
        for p in pids:
            cmd += ["--pid", str(p)]
        for q in ("maildrop", "incoming", "active", "deferred", "hold"):
            cmd += ["--queue-dir", os.path.join(args.postfix_queue, q)]
        log_offset = os.path.getsize(args.postfix_log)
    else:
        dkim = "ed25519" if side == "mta-ed25519" else "rsa"
        cmd = [args.bench, "--mta", args.mta, "--deliver", "--dkim", dkim] + common
    # The run before left its writes to the page cache: written back during
    # this run, they would slow this side's fsyncs for the other's work.
    os.sync()
    busy_before = wait_idle(args.quiet_wait, args.quiet_threshold) if args.quiet_wait else None
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m0, t0 = machine_busy(), time.monotonic()
    parts0 = [tree_cpu([p]) for p in pids]
    with open(os.path.join(out_dir, "bench.stderr"), "wb") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, timeout=args.run_timeout)
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    # Postfix's master tree and OpenDKIM apart, over the whole invocation
    # (warm-up included), for where the time goes.
    parts = [tree_cpu([p]) - c for p, c in zip(pids, parts0)]
    ours += sum(parts)
    machine = machine_busy() - m0
    errors = []
    if proc.returncode != 0:
        tail = open(os.path.join(out_dir, "bench.stderr"), errors="replace").read()[-2000:]
        raise SystemExit(f"{side} {size} KiB {label}: bench failed ({proc.returncode}):\n"
                         f"{' '.join(cmd)}\n{tail}")
    report = json.loads(proc.stdout)
    if side == "postfix":
        statuses = postfix_statuses(args.postfix_log, log_offset, warmup + messages)
        report["postfix_statuses"] = statuses
        report["cpu_ms_per_msg_incl_warmup"] = {
            "postfix": 1000 * parts[0] / (warmup + messages),
            "opendkim": 1000 * parts[1] / (warmup + messages)}
        if statuses != {"sent": warmup + messages}:
            errors.append(f"Postfix log statuses {statuses}, expected sent={warmup + messages}")
        records = read_records(args.postfix_dkim_records)
        algorithm = "rsa-sha256"
    else:
        records = read_records(os.path.join(sample_dir, "dkim-records.txt"))
        algorithm = "ed25519-sha256" if side == "mta-ed25519" else "rsa-sha256"
    ok, total, failures = verify_samples(sample_dir, records, algorithm)
    if ok != total or total == 0:
        errors.append(f"DKIM: {ok}/{total} samples verified: {failures[:3]}")
    report.update({
        "side": side, "label": label, "command": cmd, "wall_seconds": wall,
        "busy_cores_before": busy_before,
        # CPU of everything else on the machine during the invocation
        # (the other engineer's builds, kernel threads doing our I/O).
        "other_cores": max(0.0, machine - ours) / wall,
        "dkim_verified": ok, "dkim_samples": total, "errors": errors,
    })
    with open(os.path.join(out_dir, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    d = report["delivery"]
    log(f"  {size:>3} KiB {label:<7} {side:<12} accepted {report['accepted_per_second']:7.0f}/s"
        f"  delivered {d['delivered_per_second']:7.0f}/s  p99 {report['transaction_p99_ms']:6.1f} ms"
        f"  CPU {report['server_cpu_ms_per_message']:.2f} ms/msg"
        f"  RSS {report['memory']['rss_sum_mb']:.0f} MiB  other load {report['other_cores']:.2f} cores"
        f"  DKIM {ok}/{total}"
        + ("  (Postfix {postfix:.2f} + OpenDKIM {opendkim:.2f} ms/msg)".format(
            **report["cpu_ms_per_msg_incl_warmup"]) if pids else "")
        + (f"  ERRORS {errors}" if errors else ""))
    return report


# ------------------------------------------------------------- report
METRICS = [
    ("accepted msgs/s", lambda r: r["accepted_per_second"], "{:,.0f}"),
    ("delivered msgs/s", lambda r: r["delivery"]["delivered_per_second"], "{:,.0f}"),
    ("p99 time to 250 (ms)", lambda r: r["transaction_p99_ms"], "{:.1f}"),
    ("CPU ms/msg", lambda r: r["server_cpu_ms_per_message"], "{:.2f}"),
    ("peak RSS, sum (MiB)", lambda r: r["memory"]["rss_sum_mb"], "{:.0f}"),
    ("peak PSS, sum (MiB)", lambda r: r["memory"]["pss_sum_mb"], "{:.0f}"),
    ("processes", lambda r: r["memory"]["processes"], "{:.0f}"),
    ("other load (cores)", lambda r: r["other_cores"], "{:.2f}"),
]
NAMES = {"mta": "mta (RSA-2048)", "postfix": "Postfix + OpenDKIM (RSA-2048)",
         "mta-ed25519": "mta (Ed25519)"}


def cell(runs, key, fmt):
    vals = [key(r) for r in runs]
    med = statistics.median(vals)
    if len(vals) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(min(vals))}–{fmt.format(max(vals))}]"


def median(runs, key):
    return statistics.median(key(r) for r in runs)


def render(results, sides):
    lines = []
    for size, by_side in results.items():
        n = by_side["mta"][0]["messages"]
        lines.append(f"\n### {size} KiB, {n:,} messages per run, "
                     f"{by_side['mta'][0]['connections']} connections, "
                     f"{len(by_side['mta'])} run(s): median [min–max]\n")
        lines.append("| | " + " | ".join(NAMES[s] for s in sides) + " |")
        lines.append("|---" * (len(sides) + 1) + "|")
        for name, key, fmt in METRICS:
            lines.append(f"| {name} | " + " | ".join(cell(by_side[s], key, fmt) for s in sides) + " |")
        mta, pf = by_side["mta"], by_side["postfix"]
        delivered = median(mta, METRICS[1][1]) / median(pf, METRICS[1][1])
        cpu = median(pf, METRICS[3][1]) / median(mta, METRICS[3][1])
        p99 = median(pf, METRICS[2][1]) / median(mta, METRICS[2][1])
        lines.append(f"\nRatios (RSA-2048 both sides, medians): delivered msgs/s mta/Postfix "
                     f"**{delivered:.2f}×** (goal ≥ 5); CPU per message Postfix/mta "
                     f"**{cpu:.2f}×** (goal ≥ 5); p99 time to 250 Postfix/mta **{p99:.2f}×** "
                     f"(goal > 1).")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--mta", required=True)
    ap.add_argument("--server", default="127.0.0.1:2525", help="Postfix's smtpd")
    ap.add_argument("--sink", default="127.0.0.1:2626", help="where both relay to")
    ap.add_argument("--postfix-pidfile", required=True)
    ap.add_argument("--opendkim-pidfile", required=True)
    ap.add_argument("--postfix-queue", required=True)
    ap.add_argument("--postfix-log", required=True)
    ap.add_argument("--postfix-dkim-records", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--sizes", default="1,10,100")
    ap.add_argument("--messages", default="1=6000,10=6000,100=3000",
                    help="messages per measured run, by size in KiB")
    ap.add_argument("--warmup", type=int, default=1000,
                    help="messages bench sends before measuring (a tenth at 100 KiB)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup-round", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--sample", type=int, default=3, help="messages kept per run for DKIM checks")
    ap.add_argument("--ed25519", action="store_true", help="also the mta with Ed25519")
    ap.add_argument("--quiet-wait", type=float, default=5,
                    help="seconds to wait at most for an idle machine before each run")
    ap.add_argument("--quiet-threshold", type=float, default=0.3)
    ap.add_argument("--run-timeout", type=float, default=600)
    args = ap.parse_args()
    for a in (args.server, args.sink):
        if not a.startswith("127."):
            raise SystemExit(f"refusing a non-loopback address: {a}")
    os.makedirs(args.results, exist_ok=True)
    per_size = dict(kv.split("=") for kv in args.messages.split(","))
    sides = ["mta", "postfix"] + (["mta-ed25519"] if args.ed25519 else [])
    results, failed = {}, []
    started = time.monotonic()
    for size in (int(s) for s in args.sizes.split(",")):
        messages = int(per_size[str(size)])
        warmup = args.warmup if size < 100 else max(1, args.warmup // 10)
        results[size] = {s: [] for s in sides}
        rounds = (["warmup"] if args.warmup_round else []) + [f"run{i}" for i in range(1, args.runs + 1)]
        for label in rounds:
            for side in sides:
                n = warmup if label == "warmup" else messages
                r = run_bench(args, side, size, n, warmup, label)
                failed.extend(f"{size} KiB {label} {side}: {e}" for e in r["errors"])
                if label != "warmup":
                    results[size][side].append(r)
    table = render(results, sides)
    with open(os.path.join(args.results, "summary.md"), "w") as fh:
        fh.write(table)
    with open(os.path.join(args.results, "results.json"), "w") as fh:
        json.dump({str(k): v for k, v in results.items()}, fh, indent=2)
    print(table)
    log(f"done in {time.monotonic() - started:.0f} s; results in {args.results}")
    if failed:
        for f in failed:
            log(f"FAILED: {f}")
        sys.exit(1)


if __name__ == "__main__":
    main()
