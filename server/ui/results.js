// One column's answer: the text as it streams, then tokens, latency, cost against plain
// decoding, what the strategy reported (guided steps, fallbacks, budget), every candidate with
// its scores when the request asked for them, and the rating controls.

import { clear, el, formatNumber, formatSeconds } from "./dom.js";
import { preferButton, ratingControls } from "./feedback.js";

// An empty result area; returns the handle the column fills as the stream arrives.
export function startResult(container) {
  clear(container);
  const answer = el("div", { class: "answer", "aria-live": "off" });
  const progress = el("p", { class: "progress muted", role: "status" }, "Waiting for the server…");
  const details = el("div", { class: "details" });
  container.append(progress, answer, details);
  return { container, answer, progress, details, stats: null };
}

export function showText(handle, text) {
  handle.answer.textContent = text;
}

export function showProgress(handle, message) {
  handle.progress.textContent = message;
}

function stat(name, label, value, exact) {
  return [el("dt", {}, label), el("dd", { "data-stat": name, "data-value": exact ?? null }, value)];
}

function alignmentNotes(alignment) {
  const notes = [];
  if (alignment.guided_steps !== undefined) {
    notes.push(stat("guided_steps", "Guided", `${alignment.guided_steps} steps`, alignment.guided_steps));
  }
  if (alignment.fallback) {
    const why = typeof alignment.fallback === "object" ? JSON.stringify(alignment.fallback) : String(alignment.fallback);
    notes.push(stat("fallback", "Fallback", why));
  }
  const budget = alignment.budget || {};
  if (budget.exhausted) notes.push(stat("budget", "Budget", `stopped at ${budget.exhausted}`));
  if (alignment.candidates_used !== undefined) {
    notes.push(stat("candidates_used", "Candidates used", String(alignment.candidates_used)));
  }
  if (alignment.rounds !== undefined) notes.push(stat("rounds", "Rounds", JSON.stringify(alignment.rounds)));
  return notes;
}

function candidateItem(candidate, selected, responseId, status) {
  const perReward = Object.entries(candidate.scores || {}).map(([name, value]) =>
    el("span", { class: "reward-score", "data-reward": name, "data-value": value ?? "null" },
      `${name} ${formatNumber(value)}`));
  const header = el("div", { class: "candidate-head" },
    el("span", { class: "candidate-index" }, `#${candidate.index}`),
    selected ? el("strong", { class: "badge" }, "✓ selected") : null,
    el("span", { class: "score", "data-value": candidate.score ?? "null" }, `score ${formatNumber(candidate.score)}`),
    perReward,
    candidate.completion_tokens !== undefined ? el("span", { class: "muted" }, `${candidate.completion_tokens} tokens`) : null,
    candidate.finish_reason ? el("span", { class: "muted" }, candidate.finish_reason) : null);
  return el("li", { class: selected ? "candidate selected" : "candidate", "data-index": candidate.index,
                    "aria-current": selected ? "true" : null },
    header, el("p", { class: "candidate-text" }, candidate.text ?? ""),
    responseId ? preferButton(responseId, candidate.index, status) : null);
}

function candidatesList(alignment, responseId) {
  const candidates = alignment.candidates || [];
  if (!candidates.length) return null;
  const selected = new Set(alignment.selected || []);
  const status = el("p", { class: "feedback-status", role: "status" });
  return el("details", { class: "candidates", open: true },
    el("summary", {}, `Candidates (${candidates.length})`),
    el("ol", { class: "candidate-list" },
      candidates.map((c) => candidateItem(c, selected.has(c.index), responseId, status))),
    status);
}

// The finished column: `outcome` is {id, text, usage, alignment, error, ttft_s, latency_s}.
export function finishResult(handle, outcome) {
  const { details } = handle;
  clear(details);
  if (outcome.error) {
    handle.progress.textContent = "";
    details.append(el("p", { class: "error", role: "alert" },
      `Error ${outcome.error.status || ""}: ${outcome.error.message}`,
      outcome.error.param ? ` (${outcome.error.param})` : ""));
    return;
  }
  const alignment = outcome.alignment || {};
  const usage = outcome.usage || {};
  handle.progress.textContent = outcome.text ? "" : "(empty answer)";
  handle.stats = el("dl", { class: "stats" },
    stat("tokens", "Tokens", String(usage.completion_tokens ?? "—"), usage.completion_tokens),
    stat("ttft", "First token", formatSeconds(outcome.ttft_s), outcome.ttft_s),
    stat("latency", "Latency", formatSeconds(outcome.latency_s), outcome.latency_s),
    stat("pieces", "Streamed", outcome.pieces === 1 ? "whole, at the end" : `in ${outcome.pieces} pieces`, outcome.pieces),
    stat("relative", "Cost vs plain", "—"),
    stat("strategy", "Strategy", `${alignment.strategy ?? "?"}${alignment.source ? ` (${alignment.source})` : ""}`),
    alignmentNotes(alignment));
  const traced = alignment.traced === undefined ? null : el("p", { class: "muted" },
    alignment.traced ? "Stored on the server (rating attaches to it)." : "Not stored on the server.");
  const parts = [handle.stats,
    outcome.id ? el("p", { class: "muted response-id" }, "id ", el("code", {}, outcome.id)) : null,
    traced,
    outcome.id ? ratingControls(outcome.id) : null,
    candidatesList(alignment, outcome.id),
    el("details", { class: "raw" }, el("summary", {}, "alignment (JSON)"),
      el("pre", {}, JSON.stringify(alignment, null, 2)))];
  details.append(...parts.filter(Boolean));
}

// Fill in the cost against the plain column of the same run (tokens and time ratios).
export function showRelative(handle, outcome, plain) {
  if (!handle.stats) return;
  const node = handle.stats.querySelector('[data-stat="relative"]');
  if (!plain) {
    node.textContent = "add a none column to compare";
    return;
  }
  if (outcome === plain) {
    node.textContent = "baseline";
    return;
  }
  const tokens = outcome.usage?.completion_tokens / plain.usage?.completion_tokens;
  const time = outcome.latency_s / plain.latency_s;
  node.dataset.value = tokens;
  node.textContent = `×${formatNumber(tokens, 1)} tokens, ×${formatNumber(time, 1)} time`;
}
