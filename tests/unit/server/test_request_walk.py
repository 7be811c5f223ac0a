"""The walk of a chat request through the code, measured: which files the request is handed
to, in order, from `ServingChat.create_chat_completion` until its answer is rendered.

A step is a call of a function in `server/`, `aligner/` or `decoding/` that receives the
request object, its `alignment` object, the `AlignmentSpec` parsed from it or the mapping
that spec hands to resolution (`spec.alignment()`). The request's
and the spec's own methods (`request.template_messages()` in `server/protocol.py`,
`spec.alignment()`) are the object reading itself and are listed apart. A file is *re-entered* when the walk comes back to it after
leaving it, the file not being on the call stack then (a helper returning to its caller is
not a re-entry). Rendering (`_respond`, `_stream` and what they call) may go back to any file.

    python -m tests.unit.server.test_request_walk     # prints the walk of a few requests
"""

from __future__ import annotations

import asyncio
import functools
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aligner.alignment import check_profile_alignment
from aligner.profiles import ProfileStore
from aligner.spec import AlignmentSpec
from aligner.store import Store
from server.app import build_app
from server.config import ServerConfig, StoreConfig
from server.protocol import ChatCompletionRequest, ErrorResponse
from tests.fakes import FakeEngine
from tests.unit.server.test_experiments_endpoints import PROFILES  # tone@1, tone@2 and the tone-test experiment

REPO = Path(__file__).resolve().parents[3]
LAYERS = ("server", "aligner", "decoding")
RENDER = {"_respond", "_stream"}  # ServingChat's render steps
MESSAGES = [{"role": "user", "content": "hello there"}]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
BODIES = {
    "plain": {"messages": MESSAGES, "max_tokens": 3},
    "best_of_n with a deadline": {"messages": MESSAGES, "max_tokens": 3, "user": "ada",
                          "alignment": {"strategy": "best_of_n", "n": 2, "reward": "length_penalty", "deadline_s": 30}},
    "profile": {"messages": MESSAGES, "max_tokens": 3, "alignment": {"profile": "concise"}},
    "tools auto, streamed": {"messages": MESSAGES, "max_tokens": 3, "tools": TOOLS, "stream": True},
    "experiment, traced in a store": {"messages": MESSAGES, "max_tokens": 3, "user": "ada",
                                      "alignment": {"experiment": "tone-test", "trace": True}},
}


@dataclass(frozen=True)
class Step:
    file: str
    function: str
    own: bool  # a method of the request itself
    render: bool
    reentry: bool


def walk(body: dict) -> list[Step]:
    """The steps of one request through a server over a fake engine (and a SQLite store with
    an experiment, when the request names one)."""
    with tempfile.TemporaryDirectory() as folder:
        if "experiment" not in body.get("alignment", {}):
            app = build_app(FakeEngine(max_model_len=1024), ServerConfig(served_model_name="fake-model"),
                            start_engine=False)
            return _walk(app.state.chat, body)
        (Path(folder) / "profiles.yaml").write_text(PROFILES)
        profiles = ProfileStore.load(Path(folder) / "profiles.yaml", check_profile_alignment)
        store = Store.open(f"sqlite:///{Path(folder) / 'store.db'}")
        try:
            app = build_app(FakeEngine(max_model_len=1024), ServerConfig(served_model_name="fake-model",
                            store=StoreConfig()), profiles=profiles, start_engine=False, store=store)
            return _walk(app.state.chat, body)
        finally:
            store.close()


def _walk(chat, body: dict) -> list[Step]:
    request = ChatCompletionRequest.model_validate({"model": "fake-model", **body})
    watched = [request] + ([request.alignment] if request.alignment is not None else [])
    steps: list[Step] = []
    left: set[str] = set()  # files the walk has been in and left
    previous: set[str] = set()  # the files on the stack at the walk's last step, and its own
    started: set = set()  # frames entered (a coroutine's frame is "called" again on every resume)
    render = False

    def layer_file(frame) -> str | None:
        return _layer_file(frame.f_code.co_filename)

    def profile(frame, event, arg):
        nonlocal render
        if (file := layer_file(frame)) is None:
            return
        local = frame.f_locals
        if event == "return" and isinstance(local.get("self"), AlignmentSpec) and isinstance(arg, dict):
            watched.append(arg)  # what the spec gives resolution (`spec.alignment()`) is the alignment too
        if event != "call" or frame in started:  # a coroutine resumed after an await: the same visit
            return
        started.add(frame)
        own = local.get("self") is request or isinstance(local.get("self"), AlignmentSpec)
        handed = any(value is w for value in local.values() for w in watched) or any(
            isinstance(value, AlignmentSpec) for value in local.values())
        if not (own or handed):
            return
        render = render or (file == "server/serving_chat.py" and frame.f_code.co_name in RENDER)
        stack, caller = set(), frame.f_back
        while caller is not None:
            if (f := layer_file(caller)) is not None:
                stack.add(f)
            caller = caller.f_back
        reentry = False
        if not own:
            active = stack | {file}
            left.update(previous - active)  # the files the walk was in and is no longer
            reentry = not render and file in left
            left.difference_update(active)
            previous.clear()
            previous.update(active)
        steps.append(Step(file, frame.f_code.co_name, own, render, reentry))

    async def run():
        answer = await chat.create_chat_completion(request)
        assert not isinstance(answer, ErrorResponse), answer
        if not hasattr(answer, "choices"):  # a stream: read it to the end
            async for _ in answer:
                pass

    sys.setprofile(profile)
    try:
        asyncio.run(run())
    finally:
        sys.setprofile(None)
    return steps


@functools.lru_cache(maxsize=None)
def _layer_file(filename: str) -> str | None:
    try:
        rel = Path(filename).resolve().relative_to(REPO)
    except ValueError:
        return None
    return str(rel) if rel.parts[0] in LAYERS else None


def files_before_render(steps: list[Step]) -> list[str]:
    return list(dict.fromkeys(s.file for s in steps if not s.own and not s.render))


def test_a_chat_request_visits_at_most_eight_files_and_never_goes_back_before_rendering():
    for name, body in BODIES.items():
        steps = walk(body)
        files = files_before_render(steps)
        assert files[0] == "server/serving_chat.py", name
        assert len(files) <= 8, (name, files)
        assert not [s for s in steps if s.reentry], (name, [s for s in steps if s.reentry])
        assert any(s.render for s in steps), name  # the walk reached the answer


def walk_with(before=None, after=None) -> list[Step]:
    """The plain request's walk with `before(request)` and `after(request)` called around
    `ServingChat._context` (a detour the measure must see)."""
    from server import serving_chat

    original = serving_chat.ServingChat._context

    async def context(self, request, inputs, request_id, profiles):
        if before is not None:
            before(request)
        ctx = await original(self, request, inputs, request_id, profiles)
        if after is not None:
            after(request)
        return ctx

    serving_chat.ServingChat._context = context
    try:
        return walk(BODIES["plain"])
    finally:
        serving_chat.ServingChat._context = original


def test_the_walk_sees_a_re_entry():
    """The measure can fail: a step that leaves a file and comes back to it is a re-entry."""
    from server import tools

    steps = walk_with(after=lambda request: tools.auto_path(request, None))  # tools.py, left after chat_inputs
    assert [(s.file, s.function) for s in steps if s.reentry] == [("server/tools.py", "auto_path")]


def test_the_walk_sees_a_re_entry_after_a_nested_call():
    """Leaving a file through a call it made into another file, then coming back to it later."""

    def attributed(path: str, source: str, name: str, namespace: dict):
        exec(compile(source, str(REPO / path), "exec"), namespace)
        return namespace[name]

    namespace: dict = {}
    namespace["inner"] = attributed("decoding/chat_format.py", "def inner(request):\n    return request\n", "inner",
                                    namespace)
    outer = attributed("server/errors.py", "def outer(request):\n    return inner(request)\n", "outer", namespace)
    again = attributed("server/errors.py", "def again(request):\n    return request\n", "again", namespace)
    steps = walk_with(before=outer, after=again)  # errors.py (into chat_format.py), ..., errors.py again
    assert [(s.file, s.function) for s in steps if s.reentry] == [("server/errors.py", "again")]


def main() -> None:
    for name, body in BODIES.items():
        print(f"## {name}")
        for s in walk(body):
            mark = " (render)" if s.render else ""
            mark += " (RE-ENTRY)" if s.reentry else ""
            print(f"  {'    ' if s.own else ''}{s.file}:{s.function}{mark}")
        print("  files before render:", ", ".join(files_before_render(walk(body))))


if __name__ == "__main__":
    main()
