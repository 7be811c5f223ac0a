"""A request's `stop` strings over an answer built from several engine requests.

vLLM ends a sequence at a stop string only within one engine request, and its `token_ids`
keep the tokens that spelled the string (only the text is cut). Strategies that grow an answer
block by block (blockwise, particle filter, beam search, speculative rejection's chunks) decode
their answer from those tokens and join blocks the engine never saw together, so they apply the
stop strings themselves: to the whole text, wherever a string starts, and, while the answer is
still growing, holding back a tail that may yet become one.
"""

from __future__ import annotations

from dataclasses import dataclass

from decoding.engine import SamplingConfig


@dataclass(frozen=True)
class StopStrings:
    strings: tuple[str, ...] = ()
    include: bool = False  # include_stop_str_in_output: the answer keeps the string it ended on

    @classmethod
    def of(cls, sampling: SamplingConfig) -> StopStrings:
        return cls(tuple(s for s in sampling.stop if s), sampling.include_stop_str_in_output)

    def cut(self, text: str) -> tuple[str, bool]:
        """`text` up to the stop string it completes first (and the string too when included),
        and whether there is one.

        >>> StopStrings(("User:", "\\n\\n")).cut("Paris.\\n\\nUser: and")
        ('Paris.', True)
        >>> StopStrings(("Us",), include=True).cut("Paris. User:")
        ('Paris. Us', True)
        >>> StopStrings(("Bye",)).cut("Paris.")
        ('Paris.', False)
        >>> StopStrings(("abcd", "bc")).cut("xabcd")  # "bc" is whole first
        ('xa', True)
        """
        # The string completed first, as the engine would meet it token by token (ties: the
        # first listed): a cut that only moves earlier as the text grows would unsay streamed text.
        hits = [(at + len(s), order, at) for order, s in enumerate(self.strings) if (at := text.find(s)) >= 0]
        if not hits:
            return text, False
        end, _, at = min(hits)
        return text[:end if self.include else at], True

    def held(self, text: str) -> int:
        """How many characters at the end of an unfinished `text` (with no stop string in it)
        may be the start of one, and so must not be streamed yet.

        >>> StopStrings(("User:",)).held("Paris.\\nUs")
        2
        >>> StopStrings(("User:",)).held("Paris.")
        0
        """
        longest = 0
        for s in self.strings:
            for size in range(min(len(s) - 1, len(text)), longest, -1):
                if s.startswith(text[len(text) - size:]):
                    longest = size
                    break
        return longest

    def streamable(self, text: str, finished: bool) -> str:
        """The part of `text` (already cut) that can be sent now.

        >>> StopStrings(("User:",)).streamable("Paris.\\nUs", finished=False)
        'Paris.\\n'
        >>> StopStrings(("User:",)).streamable("Paris.\\nUs", finished=True)
        'Paris.\\nUs'
        """
        return text if finished else text[:len(text) - self.held(text)]
