"""`urial`'s prefix and a client's own system messages."""

from __future__ import annotations

from aligner.strategies.urial import with_prefix

PREFIX = [{"role": "system", "content": "Decline harm."}, {"role": "user", "content": "q"},
          {"role": "assistant", "content": "a"}]


def test_without_a_system_message_the_prefix_just_comes_first():
    chat = [{"role": "user", "content": "hi"}]
    assert with_prefix(PREFIX, chat) == PREFIX + chat


def test_leading_system_messages_join_the_templates_theirs_first():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Use French."},
            {"role": "user", "content": "hi"}, {"role": "system", "content": "later"}, {"role": "user", "content": "?"}]
    out = with_prefix(PREFIX, chat)
    assert out[0] == {"role": "system", "content": "Be brief.\n\nUse French.\n\nDecline harm."}
    # The examples follow the one system message; a system message later in the chat stays where it was.
    assert out[1:3] == PREFIX[1:] and out[3:] == chat[2:]
    assert PREFIX[0]["content"] == "Decline harm." and chat[0]["content"] == "Be brief."  # inputs untouched
