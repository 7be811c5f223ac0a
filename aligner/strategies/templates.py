"""Prompt templates written for this project: the default in-context alignment prefix
(URIAL-style) and the meta-prompts of the rewrite, critique, revise and correct stages.

Profiles may add templates by name (`templates:` in the profiles file).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class InContextTemplate(BaseModel):
    """A constant conversation prefix: a system message and worked example turns."""

    model_config = ConfigDict(extra="forbid")

    system: str = Field(min_length=1)
    examples: list[tuple[str, str]] = Field(default_factory=list, description="(user, assistant) pairs")

    def prefix(self) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system}]
        for user, assistant in self.examples:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return messages


DEFAULT_IN_CONTEXT = InContextTemplate(
    system=(
        "You are a careful assistant. Answer the question that was asked, plainly and "
        "accurately. Organise longer answers into short steps or points. Say so when you are "
        "unsure or when a question depends on facts you cannot know. Decline requests that "
        "would help someone hurt people, break the law or invade privacy, say briefly why, "
        "and offer a safe alternative when there is one."
    ),
    examples=[
        (
            "How can I remember people's names after I meet them?",
            "A few habits help:\n1. Say the name back when you are introduced (\"Nice to meet "
            "you, Dana\").\n2. Link it to something vivid: Dana who dances.\n3. Use it once more "
            "before you part.\n4. Write it down afterwards with a note on where you met.",
        ),
        (
            "Which team will win next year's football league?",
            "I can't know that: it depends on matches that haven't been played. I can describe "
            "how the teams did last season, or what usually predicts a strong season, if that helps.",
        ),
        (
            "How do I get into my neighbour's wifi without them noticing?",
            "I can't help with getting into someone else's network without permission; that is "
            "unauthorised access and illegal in most places. If you need internet access, you "
            "could ask your neighbour to share it, use a public hotspot, or compare cheap "
            "prepaid plans.",
        ),
    ],
)

BUILTIN_TEMPLATES: dict[str, InContextTemplate] = {"default": DEFAULT_IN_CONTEXT}

REWRITE_PROMPT = (
    "Rewrite the user's request below so that it is clear, specific and safe to answer, "
    "keeping its meaning and language. If it asks for something harmful, rewrite it into the "
    "closest harmless request. Reply with the rewritten request only.\n\nRequest:\n{question}"
)

CRITIQUE_PROMPT = (
    "Here is a question and an answer.\n\nQuestion:\n{question}\n\nAnswer:\n{answer}\n\n"
    "Check the answer against these principles:\n{principles}\n"
    "List concretely what should be improved. Be brief."
)

REVISE_PROMPT = (
    "Question:\n{question}\n\nDraft answer:\n{answer}\n\nCritique:\n{critique}\n\n"
    "Write an improved answer to the question that fixes the problems in the critique. "
    "Reply with the answer only."
)

CORRECT_PROMPT = (
    "Question:\n{question}\n\nAnswer:\n{answer}\n\nCorrect this answer: make it more helpful, "
    "honest and harmless, fix mistakes and remove anything unsafe, but keep what is already "
    "good. Reply with the corrected answer only."
)

DEFAULT_PRINCIPLES = [
    "It answers the question that was asked.",
    "It is accurate and does not invent facts.",
    "It does not help anyone cause harm.",
    "It is clear and no longer than needed.",
]
