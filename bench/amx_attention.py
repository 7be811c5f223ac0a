"""vLLM's AMX attention kernel against its "vec" kernel, on an Intel CPU with AMX: how far each
decodes from float32 transformers, and how fast, side by side.

    python -m bench.amx_attention --repeats 3 --output amx_attention.json
    python -m bench.amx_attention --summarize bench/raw/amx/amx_attention.json   # the tables again

Each run is a fresh process (`python -m decoding.attention_fidelity`) with the kernel chosen by
`ALIGNER_CPU_AMX_ATTENTION` (0: the aligner plugin's "vec", 1: vLLM's own "amx"); the two
alternate, the order flipped every repeat (vec, amx, amx, vec, ...). Fidelity is measured in
each kernel's first run (it is deterministic), throughput in every run; the table gives medians
and the spread (min-max). On a CPU without AMX both runs get the same kernel, which the table
says.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from aligner.stats import wilson_interval
from bench.launch import REPO
from decoding.vllm_plugin import AMX_ATTENTION_ENV

KERNELS = {"vec": "0", "amx": "1"}


def run(kernel: str, fidelity: bool, throughput: bool, timeout_s: float = 900) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "result.json"
        command = [sys.executable, "-m", "decoding.attention_fidelity", str(output)]
        command += [] if fidelity else ["--no-fidelity"]
        command += ["--throughput"] if throughput else []
        done = subprocess.run(command, cwd=REPO, env={**os.environ, AMX_ATTENTION_ENV: KERNELS[kernel]},
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"{kernel} run failed:\n{done.stderr[-3000:]}")
        return json.loads(output.read_text())


def order(repeats: int) -> list[str]:
    """vec, amx, amx, vec, vec, amx, ...: each kernel first in half the repeats.

    >>> order(3)
    ['vec', 'amx', 'amx', 'vec', 'vec', 'amx']
    """
    out = []
    for r in range(repeats):
        out += ["vec", "amx"] if r % 2 == 0 else ["amx", "vec"]
    return out


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def share(k: int, n: int) -> str:
    low, high = wilson_interval(k, n)
    return f"{k}/{n} [{low:.3f}, {high:.3f}]"


def report(runs: dict[str, list[dict]], throughput: bool) -> None:
    print(f"\n{'kernel':<7} {'ran':<5} {'set':<6} {'mean |dlogprob|':>16} {'p99':>7} {'flips [Wilson 95%]':>24} "
          f"{'confident flips':>24}  France answer")
    for kernel, results in runs.items():
        fid = results[0]["fidelity"]
        for name in ("short", "long"):
            f = fid[name]
            print(f"{kernel:<7} {results[0]['attention']:<5} {name:<6} {f['mean_abs_logprob_diff']:>16.4f} "
                  f"{f['p99_abs_logprob_diff']:>7.4f} {share(f['flips'], f['positions']):>24} "
                  f"{share(f['confident_flips'], f['confident']):>24}  "
                  + (repr(fid['france']['answer']) if name == "short" else ""))
        both = [fid[name] for name in ("short", "long")]
        print(f"{kernel:<7} {'':<5} {'all':<6} {'':>16} {'':>7} "
              f"{share(sum(f['flips'] for f in both), sum(f['positions'] for f in both)):>24} "
              f"{share(sum(f['confident_flips'] for f in both), sum(f['confident'] for f in both)):>24}")
    france = runs["vec"][0]["fidelity"]["france"]
    print(f"float32's first token for the France question: {france['float32_first_tokens']} "
          f"(margin {france['float32_first_margin']} nats)")
    if throughput:
        print(f"\n{'kernel':<7} {'c=1 tok/s':>20} {'c=8 tok/s':>22}")
        for kernel, results in runs.items():
            print(f"{kernel:<7} {spread([r['throughput']['c1_tokens_per_s'] for r in results]):>20} "
                  f"{spread([r['throughput']['c8_tokens_per_s'] for r in results]):>22}")
        for c in (1, 8):
            key = f"c{c}_tokens_per_s"
            # Pairs in run order: the i-th amx run against the i-th vec run.
            ratios = [a["throughput"][key] / v["throughput"][key] for a, v in zip(runs["amx"], runs["vec"])]
            print(f"amx / vec at c={c}: {spread(ratios, 2)} (per repeat: {', '.join(f'{r:.2f}' for r in ratios)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--summarize", type=Path, default=None, help="print the tables of a saved --output file")
    args = parser.parse_args()
    if args.summarize:
        saved = json.loads(args.summarize.read_text())
        report(saved["runs"], all("throughput" in r for rs in saved["runs"].values() for r in rs))
        return
    runs: dict[str, list[dict]] = {k: [] for k in KERNELS}
    for kernel in order(args.repeats):
        first = not runs[kernel]
        if not first and args.no_throughput:
            continue
        result = run(kernel, fidelity=first, throughput=not args.no_throughput)
        runs[kernel].append(result)
        print(f"{kernel}: attention {result['attention']}"
              + (f", throughput {result['throughput']}" if "throughput" in result else ""), flush=True)
    report(runs, not args.no_throughput)
    if args.output:
        args.output.write_text(json.dumps({"order": order(args.repeats), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
