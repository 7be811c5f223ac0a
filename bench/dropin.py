"""Drop-in check: the structured-output, tool and sampling cases real clients send, against
this server (plain and best-of-N) and vLLM's own OpenAI server on the same model, side by side.

    python -m bench.dropin                  # start both servers, one after the other
    python -m bench.dropin --base-url URL   # only the server at URL (plain decoding)
    python -m bench.dropin --shipped        # only this server, as `make serve` starts it
    python -m bench.dropin --json-cuts 60   # instructor's JSON mode, N seeds: vLLM's default
                                            # grammar (any whitespace) against compact JSON

Each case drives a real client (the `openai` SDK, LangChain's `ChatOpenAI`, `instructor`)
and passes when the client gets what it asked for (a parsed model, a call whose arguments
parse, a token the bias forced, ...). Prints a markdown table and the pass counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CITY = [{"role": "user", "content": "Name a large city and its population as JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
HERMES_CALL = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "[A-Za-z]{1,12}", "unit": "c"\}\}</tool_call>'


class City(BaseModel):
    name: str = Field(max_length=32)
    population: int


class Column:
    """One server under one strategy: a client and the request settings every case adds."""

    def __init__(self, label: str, base_url: str, alignment: dict | None, api_key: str = "unused"):
        from openai import OpenAI

        self.label, self.base_url, self.api_key = label, base_url, api_key
        self.client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
        best_of = alignment is not None and alignment.get("strategy") == "best_of_n"
        self.sampling = {"temperature": 0.8, "seed": 11} if best_of else {"temperature": 0}
        self.extra = {"alignment": alignment} if alignment else {}

    @property
    def responses_kw(self) -> dict:
        """Settings for `client.responses`: the SDK has no `seed` there, so it rides in the body."""
        seed = {"seed": self.sampling["seed"]} if "seed" in self.sampling else {}
        return {"temperature": self.sampling["temperature"], "extra_body": {**self.extra, **seed}}

    def chat(self, extra: dict | None = None, **kw):
        return self.client.chat.completions.create(
            model=MODEL, **{**self.sampling, **kw}, extra_body={**self.extra, **(extra or {})})

    def langchain(self, **kw):
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(model=MODEL, base_url=self.base_url, api_key=self.api_key, max_retries=0, timeout=300,
                          extra_body=self.extra or None, **self.sampling, **kw)


def check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def sdk_parse(col: Column) -> None:
    reply = col.client.chat.completions.parse(model=MODEL, messages=CITY, response_format=City, max_tokens=80,
                                              **col.sampling, extra_body=col.extra)
    check(isinstance(reply.choices[0].message.parsed, City), "no parsed City")


def sdk_json_object(col: Column) -> None:
    reply = col.chat(messages=[{"role": "user", "content": "Reply with a JSON object with keys city and country."}],
                     response_format={"type": "json_object"}, max_tokens=300)
    check(isinstance(json.loads(reply.choices[0].message.content), dict), "not a JSON object")


def sdk_json_schema_stream(col: Column) -> None:
    stream = col.chat(messages=CITY, max_tokens=80, stream=True, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}})
    City.model_validate_json("".join(c.choices[0].delta.content or "" for c in stream if c.choices))


def sdk_choice(col: Column) -> None:
    reply = col.chat(messages=[{"role": "user", "content": "Is Paris in France?"}], max_tokens=5,
                     extra={"structured_outputs": {"choice": ["yes", "no"]}})
    check(reply.choices[0].message.content in ("yes", "no"), repr(reply.choices[0].message.content))


def sdk_regex(col: Column) -> None:
    reply = col.chat(messages=[{"role": "user", "content": "Make up a product code."}], max_tokens=12,
                     extra={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{4}"}})
    text = reply.choices[0].message.content
    check(len(text) == 8 and text[3] == "-", repr(text))


def sdk_named_tool(col: Column) -> None:
    reply = col.chat(messages=QUESTION, tools=[WEATHER], max_tokens=60,
                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = reply.choices[0].message.tool_calls
    check(json.loads(call.function.arguments)["unit"] in ("c", "f"), call.function.arguments)


def sdk_required_tool(col: Column) -> None:
    reply = col.chat(messages=QUESTION, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                     max_tokens=120)
    check(reply.choices[0].finish_reason == "tool_calls", reply.choices[0].finish_reason)
    check(json.loads(reply.choices[0].message.tool_calls[0].function.arguments)["city"], "no city")


def sdk_streamed_tool_call(col: Column) -> None:
    """A `required` call streamed: OpenAI's deltas (id and name once, then pieces of the
    arguments, merged by index as the SDK's users merge them); under plain decoding the
    arguments must arrive in pieces as they decode, not whole at the end."""
    stream = col.chat(messages=QUESTION, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                      max_tokens=120, stream=True)
    deltas = [d for chunk in stream for choice in chunk.choices for d in choice.delta.tool_calls or []]
    check(bool(deltas) and deltas[0].id is not None and deltas[0].function.name == "get_weather", f"first: {deltas[:1]}")
    check(all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:]), "a second call or id")
    arguments = "".join(d.function.arguments or "" for d in deltas)
    check(json.loads(arguments)["unit"] in ("c", "f"), arguments)
    pieces = sum(bool(d.function.arguments) for d in deltas)
    check(pieces > 1 or col.extra.get("alignment", {}).get("strategy") == "best_of_n",
          f"arguments in {pieces} piece(s)")  # best-of-N sends the chosen answer when it is chosen


def sdk_auto_tool(col: Column) -> None:
    reply = col.chat(messages=QUESTION, tools=[WEATHER], max_tokens=60,
                     extra={"structured_outputs": {"regex": HERMES_CALL}})
    calls = reply.choices[0].message.tool_calls or []
    check(len(calls) == 1 and calls[0].function.name == "get_weather", f"calls: {calls}")


def sdk_auto_tool_default(col: Column) -> None:
    """Tools without tool_choice (OpenAI's default `auto`, what frameworks send), no forced
    format: a message, or calls whose arguments parse; either passes."""
    reply = col.chat(messages=QUESTION, tools=[WEATHER], max_tokens=60)
    message = reply.choices[0].message
    calls = message.tool_calls or []
    check(bool(calls) or bool(message.content), "neither a message nor calls")
    check(all(c.function.name == "get_weather" and json.loads(c.function.arguments).get("city") for c in calls),
          f"calls: {calls}")


def langchain_bind_tools_auto(col: Column) -> None:
    message = col.langchain(max_tokens=60).bind_tools([WEATHER]).invoke("What is the weather in Paris?")
    check(bool(message.tool_calls) or bool(message.content), repr(message))
    check(all(call["args"].get("city") for call in message.tool_calls), repr(message.tool_calls))


def sdk_tool_result_turn(col: Column) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}
    reply = col.chat(messages=QUESTION + [{"role": "assistant", "content": None, "tool_calls": [call]},
                                          {"role": "tool", "tool_call_id": "call_1", "content": "31 C, sunny"}],
                     tools=[WEATHER], tool_choice="none", max_tokens=30)
    check(bool(reply.choices[0].message.content), "empty answer")


def sdk_logit_bias(col: Column) -> None:
    from transformers import AutoTokenizer

    from decoding.model_prep import default_model_dir

    banana = AutoTokenizer.from_pretrained(default_model_dir()).encode(" banana", add_special_tokens=False)[0]
    reply = col.chat(messages=QUESTION, max_tokens=2, logit_bias={str(banana): 100})
    check(reply.choices[0].message.content.strip().startswith("banana"), repr(reply.choices[0].message.content))


def sdk_min_tokens(col: Column) -> None:
    reply = col.chat(messages=[{"role": "user", "content": "What is 2+2? Answer with one number."}], max_tokens=40,
                     extra={"min_tokens": 20})
    check(reply.usage.completion_tokens >= 20, f"{reply.usage.completion_tokens} tokens")


def sdk_logprobs(col: Column) -> None:
    reply = col.chat(messages=QUESTION, max_tokens=8, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    # usage counts every token generated (all candidates under best-of-N), the logprobs the answer's.
    check(0 < len(content) <= reply.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content),
          f"{len(content)} logprobs for {reply.usage.completion_tokens} tokens")


def responses_text(col: Column) -> None:
    response = col.client.responses.create(model=MODEL, input="What is the capital of France?",
                                           max_output_tokens=24, **col.responses_kw)
    check(bool(response.output_text) and response.usage.output_tokens > 0, repr(response.output_text))
    if col.sampling["temperature"] == 0:  # greedy: the question reached the model
        check("Paris" in response.output_text, repr(response.output_text))


def responses_stream(col: Column) -> None:
    with col.client.responses.stream(model=MODEL, input="What is the capital of France?", max_output_tokens=24,
                                     **col.responses_kw) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    check(deltas and "".join(deltas) == final.output_text, "deltas do not spell the answer")


def responses_function_call(col: Column) -> None:
    response = col.client.responses.create(
        model=MODEL, input="What is the weather in Paris?", tools=[{"type": "function", **WEATHER["function"]}],
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60, **col.responses_kw)
    calls = [item for item in response.output if item.type == "function_call"]
    check(len(calls) == 1 and json.loads(calls[0].arguments)["city"], f"output: {response.output}")


def langchain_json_schema(col: Column) -> None:
    city = col.langchain(max_tokens=80).with_structured_output(City, method="json_schema").invoke(
        "Name a large city and its population.")
    check(isinstance(city, City), repr(city))


def langchain_function_calling(col: Column) -> None:
    city = col.langchain(max_tokens=80).with_structured_output(City, method="function_calling").invoke(
        "Name a large city and its population.")
    check(isinstance(city, City), repr(city))


def langchain_bind_tools(col: Column) -> None:
    message = col.langchain(max_tokens=60).bind_tools([WEATHER], tool_choice="get_weather").invoke(
        "What is the weather in Paris?")
    check(len(message.tool_calls) == 1 and message.tool_calls[0]["args"].get("city"), repr(message.tool_calls))


def instructor_mode(mode: str) -> Callable[[Column], None]:
    def case(col: Column) -> None:
        import instructor

        patched = instructor.from_openai(col.client, mode=getattr(instructor.Mode, mode))
        city = patched.chat.completions.create(model=MODEL, messages=CITY, response_model=City, max_tokens=200,
                                               max_retries=2, **col.sampling, extra_body=col.extra)
        check(isinstance(city, City), repr(city))

    case.__name__ = f"instructor_{mode.lower()}"
    return case


CASES: list[Callable[[Column], None]] = [
    sdk_parse, sdk_json_object, sdk_json_schema_stream, sdk_choice, sdk_regex, sdk_named_tool, sdk_required_tool,
    sdk_streamed_tool_call, sdk_auto_tool, sdk_auto_tool_default, sdk_tool_result_turn, sdk_logit_bias, sdk_min_tokens, sdk_logprobs,
    responses_text, responses_stream, responses_function_call, langchain_json_schema, langchain_function_calling,
    langchain_bind_tools, langchain_bind_tools_auto, instructor_mode("JSON"), instructor_mode("TOOLS"),
]


def run_column(col: Column) -> dict[str, str]:
    """case name -> "pass" or "FAIL: why" (the first line of the error)."""
    results = {}
    for case in CASES:
        started = time.monotonic()
        try:
            case(col)
            results[case.__name__] = "pass"
        except Exception as exc:  # noqa: BLE001 - a failed case is a result, not a crash
            why = str(exc).splitlines()[0][:110] if str(exc) else type(exc).__name__
            results[case.__name__] = f"FAIL: {type(exc).__name__}: {why}"
            if col.label.startswith("aligner"):
                traceback.print_exc(limit=2, file=sys.stderr)
        print(f"{col.label:>18} {case.__name__:<28} {results[case.__name__][:60]} "
              f"({time.monotonic() - started:.1f} s)", file=sys.stderr)
    return results


def table(columns: dict[str, dict[str, str]]) -> str:
    labels = list(columns)
    lines = ["| case | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for case in CASES:
        lines.append(f"| {case.__name__} | " + " | ".join(columns[label][case.__name__] for label in labels) + " |")
    lines.append("| **passed** | " + " | ".join(
        f"**{sum(v == 'pass' for v in columns[label].values())} / {len(CASES)}**" for label in labels) + " |")
    return "\n".join(lines)


# instructor's JSON mode: `json_object`, and the schema only in a system message like this one.
JSON_MODE_SYSTEM = ("As a genius expert, your task is to understand the content and provide the parsed objects in "
                    "json that match the following json_schema:\n\n" + json.dumps(City.model_json_schema())
                    + "\n\nMake sure to return an instance of the JSON, not the schema itself")


def json_cuts(base_url: str, n: int, max_tokens: int = 200) -> dict:
    """JSON mode as instructor sends it, `n` seeds at temperature 0.8: how many answers end at
    `max_tokens` ("length") and how many are a `City`, with Wilson intervals."""
    from openai import OpenAI

    from aligner.stats import wilson_interval

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    rows = []
    for seed in range(n):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": JSON_MODE_SYSTEM}, *CITY],
            response_format={"type": "json_object"}, max_tokens=max_tokens, temperature=0.8, seed=seed)
        choice = reply.choices[0]
        try:
            City.model_validate_json(choice.message.content)
            valid = True
        except ValueError:
            valid = False
        rows.append({"seed": seed, "finish_reason": choice.finish_reason, "valid": valid,
                     "tokens": reply.usage.completion_tokens, "text": choice.message.content})
    cut, valid = sum(r["finish_reason"] == "length" for r in rows), sum(r["valid"] for r in rows)
    return {"n": n, "cut": cut, "cut_ci95": wilson_interval(cut, n), "valid": valid,
            "valid_ci95": wilson_interval(valid, n), "answers": rows}


def compare_json_cuts(n: int) -> dict[str, dict]:
    """This server as shipped (vLLM's default JSON grammar: any whitespace between tokens) and
    with compact JSON (vLLM's `disable_any_whitespace`, which needs a named backend)."""
    from bench.launch import start_server, stop_server

    work = Path(tempfile.mkdtemp(prefix="bench-json-cuts-"))
    results = {}
    compact = '{"backend": "xgrammar", "disable_any_whitespace": true}'
    for label, flags in (("any whitespace (default)", ()), ("compact", ("--structured-outputs-config", compact))):
        server = start_server(work / label.split()[0], "--max-model-len", "1024", *flags)
        try:
            results[label] = json_cuts(server.v1, n)
        finally:
            stop_server(server)
        print(f"{label}: cut {results[label]['cut']}/{n}, valid {results[label]['valid']}/{n}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=None, help="check only this server (plain decoding)")
    parser.add_argument("--output", type=Path, default=None, help="JSON results")
    parser.add_argument("--shipped", action="store_true",
                        help="only this server as `make serve` starts it (no --tool-call-parser): plain and best-of-3")
    parser.add_argument("--json-cuts", type=int, default=None, metavar="N",
                        help="only JSON mode's answers: N seeds on two servers (any whitespace, compact JSON)")
    args = parser.parse_args(argv)
    if args.json_cuts:
        results = compare_json_cuts(args.json_cuts)
        for label, r in results.items():
            print(f"| {label} | {r['cut']}/{r['n']} {r['cut_ci95']} | {r['valid']}/{r['n']} {r['valid_ci95']} |")
        if args.output:
            args.output.write_text(json.dumps(results, indent=2))
        return 0
    if args.base_url:
        columns = {"server": run_column(Column("server", args.base_url, None))}
    elif args.shipped:
        columns = shipped()
    else:
        columns = compare()
    print(table(columns))
    if args.output:
        args.output.write_text(json.dumps(columns, indent=2))
    return 0


def shipped() -> dict[str, dict[str, str]]:
    """This server with `make serve`'s flags (the shipped models, no tool parser)."""
    from bench.launch import REPO, start_server, stop_server

    server = start_server(Path(tempfile.mkdtemp(prefix="bench-dropin-shipped-")), "--models-dir", str(REPO / "models"))
    try:
        return {label: run_column(Column(label, server.v1, alignment)) for label, alignment in (
            ("aligner none (as shipped)", {"strategy": "none"}),
            ("aligner best_of_n (as shipped)", {"strategy": "best_of_n", "n": 3}))}
    finally:
        stop_server(server)


def compare() -> dict[str, dict[str, str]]:
    from bench.cli import start_vllm_server
    from bench.launch import REPO, start_server, stop_server
    from decoding.model_prep import prepare_default_model

    work = Path(tempfile.mkdtemp(prefix="bench-dropin-"))
    columns = {}
    # As `make serve` runs it (the shipped starter reward models), plus Hermes tool parsing.
    server = start_server(work, "--models-dir", str(REPO / "models"), "--tool-call-parser", "hermes")
    try:
        columns["aligner none"] = run_column(Column("aligner none", server.v1, {"strategy": "none"}))
        columns["aligner best_of_n"] = run_column(Column("aligner best_of_n", server.v1,
                                                         {"strategy": "best_of_n", "n": 3}))
    finally:
        stop_server(server)
    vllm = start_vllm_server(str(prepare_default_model()), MODEL, work,
                             "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    try:
        columns["vLLM"] = run_column(Column("vLLM", vllm.v1, None))
    finally:
        stop_server(vllm)
    return columns


if __name__ == "__main__":
    raise SystemExit(main())
