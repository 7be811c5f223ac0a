// The playground: one conversation, 1-4 columns (each a strategy with a form generated from
// its JSON schema, or a profile), sent concurrently, every column streamed as it arrives.

import { streamChat } from "./api.js";
import { clear, el } from "./dom.js";
import { finishResult, showProgress, showRelative, showText, startResult } from "./results.js";
import { buildForm } from "./schema_form.js";

const MAX_COLUMNS = 4;
const FIRST_COLUMNS = ["strategy:none", "strategy:best_of_n"];

class Column {
  constructor(playground, number) {
    this.playground = playground;
    this.number = number;
    const id = `col${number}`;
    this.choice = el("select", { id: `${id}-choice`, on: { change: () => this.choose(this.choice.value) } },
      playground.choiceOptions());
    this.params = el("div", { class: "params" });
    this.result = el("div", { class: "result", "aria-live": "polite" });
    this.remove = el("button", { type: "button", class: "remove", "aria-label": `Remove column ${number}`,
                                 on: { click: () => playground.removeColumn(this) } }, "Remove");
    this.heading = el("h3", { id: `${id}-title` }, `Column ${number}`);
    this.node = el("section", { class: "column", "aria-labelledby": `${id}-title`, "data-column": number },
      el("div", { class: "column-head" }, this.heading, this.remove),
      el("label", { for: `${id}-choice` }, "Strategy or profile"), this.choice,
      el("details", { class: "params-box" }, el("summary", {}, "Parameters"), this.params),
      this.result);
    this.id = id;
  }

  choose(value) {
    this.choice.value = value;
    clear(this.params);
    const [kind, name] = value.split(":");
    if (kind === "strategy") {
      const strategy = this.playground.strategies.find((s) => s.name === name);
      this.params.append(el("p", { class: "hint" }, strategy.description));
      this.form = buildForm(strategy.parameters, this.params, `${this.id}-${name}`,
                            { rewardList: "reward-names" });
      this.profile = null;
    } else {
      const [profileName, version] = name.split("@");
      const profile = this.playground.profiles.find((p) => p.name === profileName);
      const chosen = profile.versions.find((v) => String(v.version) === version) || profile.versions.at(-1);
      this.params.append(el("p", { class: "hint" }, chosen.description || ""),
        el("pre", { class: "profile" }, JSON.stringify(chosen.alignment, null, 2)));
      this.form = buildForm({ properties: { return_candidates: { type: "boolean", default: false,
        description: "every candidate with its per-reward scores" } } }, this.params, `${this.id}-profile`);
      this.profile = name;
    }
  }

  // {alignment, errors}: the request's alignment object from the form.
  alignment() {
    const { values, errors } = this.form.read();
    const [kind, name] = this.choice.value.split(":");
    return { alignment: kind === "strategy" ? { strategy: name, ...values } : { profile: name, ...values }, errors };
  }

  label() {
    return this.choice.value.split(":")[1];
  }

  async run(request, trace) {
    const handle = startResult(this.result);
    const { alignment, errors } = this.alignment();
    if (errors.length) {
      const outcome = { error: { message: errors.join("; ") } };
      finishResult(handle, outcome);
      return { column: this, handle, outcome };
    }
    if (trace) alignment.trace = true;
    const started = performance.now();
    const outcome = { text: "", alignment: null, usage: null, id: null, ttft_s: null, pieces: 0 };
    const onChunk = (chunk) => {
      if (chunk.keepAlive) {
        showProgress(handle, `Working… ${((performance.now() - started) / 1000).toFixed(1)} s`);
        return;
      }
      outcome.id = outcome.id || chunk.id;
      for (const choice of chunk.choices || []) {
        const content = choice.delta?.content;
        if (content) {
          outcome.ttft_s = outcome.ttft_s ?? (performance.now() - started) / 1000;
          outcome.text += content;
          outcome.pieces += 1;
          showText(handle, outcome.text);
          showProgress(handle, "Streaming…");
        }
      }
      if (chunk.alignment) outcome.alignment = chunk.alignment;
      if (chunk.usage) outcome.usage = chunk.usage;
    };
    const ended = await streamChat({ ...request, alignment }, onChunk);
    outcome.latency_s = (performance.now() - started) / 1000;
    if (ended.error) outcome.error = ended.error;
    finishResult(handle, outcome);
    return { column: this, handle, outcome };
  }
}

export class Playground {
  constructor(root, info) {
    this.root = root;
    this.strategies = info.strategies;
    this.profiles = info.profiles;
    this.columns = [];
    this.numbered = 0;
    this.columnsNode = root.querySelector("#columns");
    this.addButton = root.querySelector("#add-column");
    this.sendButton = root.querySelector("#send");
    this.status = root.querySelector("#send-status");
    const models = root.querySelector("#model");
    clear(models).append(...info.models.map((m) => el("option", { value: m }, m)));
    clear(root.querySelector("#reward-names")).append(...info.rewards.map((r) => el("option", { value: r })));
    this.addButton.addEventListener("click", () => this.addColumn().choice.focus());
    root.querySelector("#chat-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    root.querySelector("#message").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        this.send();
      }
    });
    for (const choice of FIRST_COLUMNS) this.addColumn(choice);
  }

  choiceOptions() {
    return [
      el("optgroup", { label: "Strategies" },
        this.strategies.map((s) => el("option", { value: `strategy:${s.name}` }, s.name))),
      this.profiles.length ? el("optgroup", { label: "Profiles" }, this.profiles.flatMap((p) =>
        p.versions.map((v) => el("option", { value: `profile:${p.name}@${v.version}` }, `${p.name}@${v.version}`)))) : null,
    ];
  }

  addColumn(choice = "strategy:none") {
    if (this.columns.length >= MAX_COLUMNS) return this.columns.at(-1);
    const column = new Column(this, ++this.numbered);
    column.choose(choice);
    this.columns.push(column);
    this.columnsNode.append(column.node);
    this.updateButtons();
    return column;
  }

  removeColumn(column) {
    if (this.columns.length <= 1) return;
    this.columns = this.columns.filter((c) => c !== column);
    column.node.remove();
    this.updateButtons();
    this.addButton.focus();
  }

  updateButtons() {
    this.addButton.disabled = this.columns.length >= MAX_COLUMNS;
    for (const column of this.columns) column.remove.disabled = this.columns.length <= 1;
    this.columnsNode.dataset.count = this.columns.length;
  }

  // The request every column shares: conversation, model and sampling settings.
  request() {
    const value = (id) => this.root.querySelector(`#${id}`).value.trim();
    const messages = [];
    if (value("system")) messages.push({ role: "system", content: value("system") });
    messages.push({ role: "user", content: value("message") });
    const request = { model: value("model"), messages };
    for (const [id, field] of [["max-tokens", "max_tokens"], ["temperature", "temperature"], ["seed", "seed"]]) {
      if (value(id) !== "") request[field] = Number(value(id));
    }
    return request;
  }

  async send() {
    if (this.running) return;
    if (!this.root.querySelector("#message").value.trim()) {
      this.status.textContent = "Write a message first.";
      this.root.querySelector("#message").focus();
      return;
    }
    this.running = true;
    this.sendButton.disabled = true;
    this.root.setAttribute("aria-busy", "true");
    this.status.textContent = `Running ${this.columns.length} column${this.columns.length > 1 ? "s" : ""}…`;
    const request = this.request();
    const trace = this.root.querySelector("#trace").checked;
    const runs = await Promise.all(this.columns.map((column) => column.run(request, trace)));
    const plain = runs.find((r) => r.column.choice.value === "strategy:none" && !r.outcome.error);
    for (const run of runs) {
      if (!run.outcome.error) showRelative(run.handle, run.outcome, plain?.outcome);
    }
    const failed = runs.filter((r) => r.outcome.error).length;
    this.status.textContent = failed ? `Done: ${failed} of ${runs.length} columns failed.` : "Done.";
    this.root.removeAttribute("aria-busy");
    this.sendButton.disabled = false;
    this.running = false;
  }
}
