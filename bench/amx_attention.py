"""vLLM's AMX attention kernel against its "vec" kernel, on an Intel CPU with AMX: how far each
decodes from float32 transformers, and how fast, side by side; and (`--arms vec,vec-avx512`)
the AMX matrix multiplications against oneDNN's AVX-512 ones.

    python -m bench.amx_attention --repeats 3 --output amx_attention.json
    python -m bench.amx_attention --arms vec,vec-avx512 --repeats 2 --repeatability --output amx_gemm.json
    python -m bench.amx_attention --summarize bench/raw/amx/amx_attention.json   # the tables again

Each run is a fresh process (`python -m decoding.attention_fidelity`) with its arm's
environment: "vec" `ALIGNER_CPU_AMX_ATTENTION=0` (the plugin's kernel), "amx" `=1` (vLLM's own),
"vec-avx512" the plugin's kernel with `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` (oneDNN's GEMMs
without AMX). The arms alternate, the order reversed every repeat (vec, amx, amx, vec, ...). Fidelity is measured in
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

ARMS = {
    "vec": {AMX_ATTENTION_ENV: "0"},
    "amx": {AMX_ATTENTION_ENV: "1"},
    "vec-avx512": {AMX_ATTENTION_ENV: "0", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
}


def run(arm: str, fidelity: bool, throughput: bool, repeatability: bool = False, timeout_s: float = 900) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "result.json"
        command = [sys.executable, "-m", "decoding.attention_fidelity", str(output)]
        command += [] if fidelity else ["--no-fidelity"]
        command += ["--throughput"] if throughput else []
        command += ["--repeatability"] if repeatability else []
        done = subprocess.run(command, cwd=REPO, env={**os.environ, **ARMS[arm]},
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"{arm} run failed:\n{done.stderr[-3000:]}")
        return json.loads(output.read_text())


def order(repeats: int, arms: tuple[str, ...] = ("vec", "amx")) -> list[str]:
    """vec, amx, amx, vec, vec, amx, ...: the arms in turn, reversed every other repeat.

    >>> order(3)
    ['vec', 'amx', 'amx', 'vec', 'vec', 'amx']
    """
    out: list[str] = []
    for r in range(repeats):
        out += list(arms) if r % 2 == 0 else list(reversed(arms))
    return out


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def share(k: int, n: int) -> str:
    low, high = wilson_interval(k, n)
    return f"{k}/{n} [{low:.3f}, {high:.3f}]"


def report(runs: dict[str, list[dict]], throughput: bool) -> None:
    with_fidelity = {arm: results for arm, results in runs.items() if "fidelity" in results[0]}
    if with_fidelity:
        print(f"\n{'arm':<11} {'ran':<5} {'set':<6} {'mean |dlogprob|':>16} {'p99':>7} {'flips [Wilson 95%]':>24} "
              f"{'confident flips':>24}  France answer")
    for arm, results in with_fidelity.items():
        fid = results[0]["fidelity"]
        for name in ("short", "long"):
            f = fid[name]
            print(f"{arm:<11} {results[0]['attention']:<5} {name:<6} {f['mean_abs_logprob_diff']:>16.4f} "
                  f"{f['p99_abs_logprob_diff']:>7.4f} {share(f['flips'], f['positions']):>24} "
                  f"{share(f['confident_flips'], f['confident']):>24}  "
                  + (repr(fid['france']['answer']) if name == "short" else ""))
        both = [fid[name] for name in ("short", "long")]
        print(f"{arm:<11} {'':<5} {'all':<6} {'':>16} {'':>7} "
              f"{share(sum(f['flips'] for f in both), sum(f['positions'] for f in both)):>24} "
              f"{share(sum(f['confident_flips'] for f in both), sum(f['confident'] for f in both)):>24}")
    if with_fidelity:
        france = next(iter(with_fidelity.values()))[0]["fidelity"]["france"]
        print(f"float32's first token for the France question: {france['float32_first_tokens']} "
              f"(margin {france['float32_first_margin']} nats)")
    for arm, results in runs.items():
        for r in results:
            if "repeatability" in r:
                rep = r["repeatability"]
                print(f"{arm}: the same greedy answer three times in a row (prefix cache cold, then warm): "
                      f"{share(rep['same_all_three'], rep['questions'])}")
    if throughput:
        keys = [k for k in ("c1_tokens_per_s", "c8_tokens_per_s", "prefill_tokens_per_s")
                if all(k in r["throughput"] for rs in runs.values() for r in rs)]
        print(f"\n{'arm':<11} " + " ".join(f"{k.removesuffix('_tokens_per_s') + ' tok/s':>22}" for k in keys))
        for arm, results in runs.items():
            print(f"{arm:<11} " + " ".join(f"{spread([r['throughput'][k] for r in results]):>22}" for k in keys))
        base, *others = list(runs)
        for arm in others:
            for k in keys:
                # Pairs in run order: the i-th run of the arm against the i-th run of the base.
                ratios = [a["throughput"][k] / b["throughput"][k] for a, b in zip(runs[arm], runs[base])]
                print(f"{arm} / {base}, {k.removesuffix('_tokens_per_s')}: {spread(ratios, 2)} "
                      f"(per repeat: {', '.join(f'{r:.2f}' for r in ratios)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arms", default="vec,amx", help=f"two or more of {', '.join(ARMS)}; the first is the base")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--repeatability", action="store_true", help="also cold- against warm-cache greedy answers")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--summarize", type=Path, default=None, help="print the tables of a saved --output file")
    args = parser.parse_args()
    if args.summarize:
        saved = json.loads(args.summarize.read_text())
        report(saved["runs"], all("throughput" in r for rs in saved["runs"].values() for r in rs))
        return
    arms = tuple(args.arms.split(","))
    unknown = [a for a in arms if a not in ARMS]
    if unknown or len(arms) < 2:
        parser.error(f"--arms: two or more of {list(ARMS)}")
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for arm in order(args.repeats, arms):
        first = not runs[arm]
        if not first and args.no_throughput:
            continue
        result = run(arm, fidelity=first, throughput=not args.no_throughput, repeatability=first and args.repeatability)
        runs[arm].append(result)
        print(f"{arm}: attention {result['attention']}"
              + (f", throughput {result['throughput']}" if "throughput" in result else ""), flush=True)
    report(runs, not args.no_throughput)
    if args.output:
        args.output.write_text(json.dumps({"order": order(args.repeats, arms), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
