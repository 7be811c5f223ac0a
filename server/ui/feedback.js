// Rating an answer (thumbs, or 1-5 stars) and preferring a candidate, sent to
// POST /v1/alignment/feedback; the status line says whether the server recorded it.

import { api } from "./api.js";
import { el } from "./dom.js";

// A client key per (response, judgement): a repeated click, or a retry after a lost answer,
// is stored once, and two different judgements are two rows.
function clientKey(responseId, what) {
  return `ui:${responseId}:${what}`;
}

function describe(body) {
  if (body.thumbs) return `thumbs ${body.thumbs}`;
  if (body.rating) return `${body.rating} of 5`;
  return `candidate ${body.preferred_candidate} preferred`;
}

export async function sendFeedback(body, status, what) {
  status.textContent = "Sending…";
  status.removeAttribute("data-recorded");
  const result = await api("/v1/alignment/feedback", {
    method: "POST", body: { ...body, client_key: clientKey(body.id, what) },
  });
  if (result.ok) {
    const rows = (result.data.data || []).map((row) => `#${row.id}`).join(", ");
    status.textContent = `Recorded: ${describe(body)}${rows ? ` (feedback ${rows})` : ""}.`;
    status.dataset.recorded = "true";
    status.classList.remove("error");
  } else {
    const { status: code, message } = result.error;
    const why = code === 404 && result.error.message === "Not Found" ? "this server has no feedback endpoint" : message;
    status.textContent = `Not recorded (${code}): ${why}`;
    status.dataset.recorded = "false";
    status.classList.add("error");
  }
}

// Thumbs up/down and 1-5 stars for the answer `responseId`, with its own status line.
export function ratingControls(responseId) {
  const status = el("p", { class: "feedback-status", role: "status" });
  const send = (body, what) => sendFeedback({ id: responseId, ...body }, status, what);
  const thumbs = [["up", "▲ Up", "Thumbs up"], ["down", "▼ Down", "Thumbs down"]].map(([value, icon, label]) =>
    el("button", { type: "button", class: "thumb", "aria-label": label, title: label, "data-thumbs": value,
                   on: { click: () => send({ thumbs: value }, `thumbs-${value}`) } }, icon));
  const stars = [1, 2, 3, 4, 5].map((n) =>
    el("button", { type: "button", class: "star", "aria-label": `Rate ${n} of 5`, title: `${n} of 5`,
                   "data-rating": n, on: { click: () => send({ rating: n }, `rating-${n}`) } }, String(n)));
  return el("div", { class: "rating" },
    el("div", { role: "group", "aria-label": "Rate this answer", class: "rating-buttons" },
      el("span", { class: "muted", "aria-hidden": "true" }, "Rate:"), thumbs,
      el("span", { class: "muted", "aria-hidden": "true" }, "or ★"), stars),
    status);
}

// "This candidate is better" for candidate `index` of the answer `responseId`.
export function preferButton(responseId, index, status) {
  return el("button", {
    type: "button", class: "prefer", "data-candidate": index, "aria-label": `This candidate is better (candidate ${index})`,
    on: { click: () => sendFeedback({ id: responseId, preferred_candidate: index }, status, `candidate-${index}`) },
  }, "This candidate is better");
}
