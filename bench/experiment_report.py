"""What an experiment report costs as the experiment grows: the server's report kept up to
date (`aligner.experiments.ExperimentReports`, which reads only the rows written since its last
read) against one counted afresh from every row (what the server did before), on SQLite stores
holding 1,000 and 100,000 of the experiment's traces (and a rating on every second one).

Each round, for each size in turn (interleaved, so drift hits both alike), the benchmark writes
what a dashboard's poll interval brings under steady traffic (`--new` traces, through the
store's own `put_trace`, and a rating on half of them), then times one report kept up to date
and one counted afresh; it prints the medians and the ratio of the large store to the small.

    python -m bench.experiment_report                       # 1k and 100k, 7 rounds
    python -m bench.experiment_report --sizes 1000,10000,100000 --output bench/raw/experiment_report.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


from aligner.experiments import Experiment, ExperimentReports, experiment_report
from aligner.store import Store, conversation_hash
from aligner.store.schema import feedback, store_counters, traces

EXPERIMENT = Experiment(name="tone-test", arms=[{"profile": "tone@1"}, {"profile": "tone@2"}])
ANSWER = "A plain answer of a few sentences, about as long as the default max_tokens gives. " * 6


def trace_row(i: int, rng: random.Random, now: float) -> dict:
    conversation = [{"role": "user", "content": f"question {i % 500}"}]
    return {"id": f"r{i:07d}", "created_at": now - 3600 + i * 1e-3, "user": f"user-{i % 5000}",
            "conversation": conversation, "conversation_hash": conversation_hash(conversation),
            "strategy": "best_of_n", "experiment": EXPERIMENT.name, "arm": f"tone@{1 + i % 2}",
            "candidates": [{"text": ANSWER, "score": rng.gauss(0, 1)} for _ in range(2)], "selected": [0],
            "usage": {"prompt_tokens": 12, "completion_tokens": rng.randint(20, 160)},
            "timings": {"total_s": rng.expovariate(2)}}


def fill(path: Path, size: int, seed: int = 0) -> Store:
    """A store with `size` traces of the experiment, in bulk (as if written over days), and
    other traffic of the same size outside it; a thumbs rating on every second trace."""
    store = Store.open(f"sqlite:///{path}")
    rng, now = random.Random(seed), time.time()
    with store.engine.begin() as conn:
        for start in range(0, 2 * size, 5000):
            rows = []
            for i in range(start, min(start + 5000, 2 * size)):
                row = trace_row(i, rng, now)
                if i % 2:  # every other trace is another experiment's or none's
                    row.update(experiment=None, arm=None)
                rows.append({**row, "seq": i + 1})
            conn.execute(traces.insert(), rows)
            conn.execute(feedback.insert(), [
                {"trace_id": row["id"], "created_at": now, "user": row["user"], "kind": "rating",
                 "rating": rng.choice([-1, 1]), "rating_scale": "thumbs"} for row in rows[::4]])
        conn.execute(store_counters.update().where(store_counters.c.name == "traces").values(value=2 * size))
    return store


def add_traffic(store: Store, first: int, count: int, rng: random.Random) -> None:
    now = time.time()
    for i in range(first, first + count):
        row = trace_row(i, rng, now)
        del row["conversation_hash"]
        store.put_trace(row)
        if i % 2 == 0:
            store.add_feedback(row["id"], rating=rng.choice([-1, 1]), rating_scale="thumbs", user=row["user"])


def machine() -> str:
    """The CPU's model name and its vector extensions of note, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extensions = [f for f in ("avx2", "avx512f", "amx_tile") if f in flags]
    return f"{name}, {info.count('processor')} CPUs, {' '.join(extensions)}"


def timed(fn) -> tuple[float, dict]:
    started = time.perf_counter()
    report = fn()
    return time.perf_counter() - started, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new", type=int, default=100, help="traces written between two reports")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="experiment-report-"))
    stores = {size: fill(folder / f"{size}.db", size) for size in sizes}
    reports = {size: ExperimentReports() for size in sizes}
    next_id = {size: 2 * size for size in sizes}
    rng = random.Random(1)
    rows: list[dict] = []
    try:
        for size in sizes:  # the first read of each: the whole experiment, once
            seconds, _ = timed(lambda s=size: reports[s].report(stores[s], EXPERIMENT.name, EXPERIMENT, None))
            rows.append({"round": 0, "size": size, "kind": "kept, first read", "seconds": seconds})
        for round_ in range(1, args.rounds + 1):
            for size in sizes:
                store = stores[size]
                add_traffic(store, next_id[size], args.new, rng)
                next_id[size] += args.new
                kept_s, kept = timed(lambda s=size: reports[s].report(stores[s], EXPERIMENT.name, EXPERIMENT, None))
                fresh_s, fresh = timed(lambda s=store: experiment_report(
                    EXPERIMENT.name, EXPERIMENT, s.experiment_traces(EXPERIMENT.name),
                    s.experiment_feedback(EXPERIMENT.name)))
                if json.dumps(kept, sort_keys=True) != json.dumps(fresh, sort_keys=True):
                    raise SystemExit(f"the report kept up to date differs from one counted afresh ({size} rows)")
                rows.append({"round": round_, "size": size, "kind": "kept", "seconds": kept_s,
                             "requests": kept["requests"]})
                rows.append({"round": round_, "size": size, "kind": "afresh", "seconds": fresh_s})
    finally:
        for store in stores.values():
            store.close()
    medians = {(size, kind): statistics.median(r["seconds"] for r in rows if r["size"] == size and r["kind"] == kind)
               for size in sizes for kind in ("kept", "afresh")}
    print(f"{args.rounds} rounds, {args.new} new traces per report; median seconds per report")
    print(f"{'traces in the experiment':>26} {'kept up to date':>16} {'counted afresh':>15}")
    for size in sizes:
        print(f"{size:>26,} {medians[size, 'kept']:>16.4f} {medians[size, 'afresh']:>15.3f}")
    small, large = sizes[0], sizes[-1]
    ratios = {kind: medians[large, kind] / medians[small, kind] for kind in ("kept", "afresh")}
    print(f"{large:,} / {small:,}: kept up to date {ratios['kept']:.2f}x, counted afresh {ratios['afresh']:.1f}x")
    if args.output:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        args.output.write_text(json.dumps({
            "command": "python -m bench.experiment_report " + f"--sizes {args.sizes} --rounds {args.rounds} --new {args.new}",
            "commit": commit, "machine": machine(), "rows": rows,
            "medians": {f"{size}/{kind}": medians[size, kind] for size, kind in medians}, "ratios": ratios},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
