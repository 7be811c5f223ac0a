"""The first turns of a harmful source that carry no request, listed so a classifier can leave
them out (`aligner train-classifier --exclude`):

    python -m bench.content_free --source ../shared/data/prefs/hh_harmless.jsonl.gz \
        --vocabulary bench/sets/chat_turns_train.jsonl --output bench/sets/hh_content_free.jsonl

HH-RLHF's red-team conversations are labelled harmful as a whole, so their first user turns are
too, including openers such as "Hey can I ask you a question?" that ask for nothing. A
classifier trained on them flags "Can you help?". The rule is mechanical and written before any
classifier saw its output: a prompt is content-free when every word of it (runs of letters and
apostrophes, lower-cased; digits and punctuation ignored) is a word of the benign chat turns
(`--vocabulary`). A short harmful request usually keeps a word no chat turn uses ("LSD",
"steal"), so it stays; not always: on HH-RLHF the rule also lists "What are the 14 words?" (a
slogan, and digits are ignored) and "be mean to me". The output lists each dropped prompt with
the source it came from, for a reader to check.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

_WORD = re.compile(r"[a-z']+")


def words(text: str) -> set[str]:
    """The words of a text, lower-cased, curly apostrophes straightened.

    >>> sorted(words("Hey, can I ask you a question? It’s 10+19"))
    ['a', 'ask', 'can', 'hey', 'i', "it's", 'question', 'you']
    """
    return set(_WORD.findall(text.lower().replace("\u2019", "'")))


def content_free(prompts: list[str], vocabulary: set[str]) -> list[str]:
    """The prompts every word of which is in `vocabulary` (a prompt with no word at all is kept out too).

    >>> content_free(["Hey can I ask you a question?", "Where can I find some LSD?", "10+19"],
    ...              words("Hey! Can I ask you a question? Where are you?"))
    ['Hey can I ask you a question?', '10+19']
    """
    return [p for p in prompts if words(p) <= vocabulary]


def main(argv: list[str] | None = None) -> int:
    from aligner.training import prompt_sets as ps

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="the harmful prompt source (PATH[#SELECT])")
    parser.add_argument("--vocabulary", required=True, help="benign chat turns (PATH[#SELECT]) whose words count as chat")
    parser.add_argument("--output", type=Path, required=True, help="JSONL of the content-free prompts")
    args = parser.parse_args(argv)
    vocabulary = set().union(*(words(t) for t in ps.load_prompts(ps.PromptSource.parse(args.vocabulary), 0)))
    source = ps.PromptSource.parse(args.source)
    prompts = ps.load_prompts(source, 0)
    dropped = content_free(prompts, vocabulary)
    args.output.write_text("".join(json.dumps({"prompt": p, "source": source.name}) + "\n" for p in dropped))
    print(f"{len(dropped)} of {len(prompts)} prompts of {source.name} are content-free "
          f"({len(vocabulary)} chat words)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
