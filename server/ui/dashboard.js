// The dashboard: per strategy from GET /metrics (requests, time to first token and latency
// quantiles, tokens per request, fallbacks), the server's errors and store counters, and the
// experiments' arms from the store (experiments.js).

import { api } from "./api.js";
import { barChart } from "./charts.js";
import { clear, el, formatNumber, formatSeconds, table } from "./dom.js";
import { Experiments } from "./experiments.js";
import { byLabel, parseMetrics, QUANTILES, strategySummary, value } from "./prometheus.js";

const AUTO_REFRESH_MS = 5000;
const pct = (q) => `p${Math.round(q * 100)}`;

function strategyTable(summary) {
  const quantiles = QUANTILES.map(pct).join(" / ");
  const headers = ["Strategy", "Requests", `First token ${quantiles}`, `Latency ${quantiles}`, "Tokens / request",
    "Sequences / request", "Fallbacks", "Budget stops"];
  const spread = (values) => QUANTILES.map((q) => formatSeconds(values[q])).join(" / ");
  const rows = summary.map((s) => [s.strategy, String(s.requests), spread(s.ttft), spread(s.latency),
    formatNumber(s.tokensPerRequest, 1), formatNumber(s.candidatesPerRequest, 1), String(s.fallbacks), String(s.budgetStops)]);
  const node = table("Per strategy, since the server started", headers, rows, { id: "strategy-table" });
  node.querySelectorAll("tbody tr").forEach((tr, i) => { tr.dataset.strategy = summary[i].strategy; });
  return el("div", {}, node, el("small", { class: "hint" }, "Quantiles are interpolated within the "
    + "histograms' buckets, as PromQL's histogram_quantile does: rough while there are few requests."));
}

function strategyCharts(summary) {
  const answered = summary.filter((s) => s.requests > 0);
  if (!answered.length) return el("p", { class: "muted" }, "No answered requests yet.");
  return el("div", { class: "charts" },
    barChart({ title: "Latency by strategy", series: ["p50", "p90"], format: formatSeconds,
               rows: answered.map((s) => ({ label: s.strategy, bars: [
                 { series: "p50", value: s.latency[0.5] }, { series: "p90", value: s.latency[0.9] }] })) }),
    barChart({ title: "Tokens generated per request", series: ["tokens"], format: (v) => formatNumber(v, 1),
               rows: answered.map((s) => ({ label: s.strategy, bars: [{ series: "tokens", value: s.tokensPerRequest }] })) }));
}

function serverTables(samples) {
  const pairs = (caption, headers, entries) => entries.length
    ? table(caption, headers, entries.map(([k, v]) => [k, String(v)])) : null;
  const statuses = samples.filter((s) => s.name === "aligner_requests_total" && s.value)
    .map((s) => [`${s.labels.endpoint} ${s.labels.status}`, s.value]);
  const store = [["traces written", value(samples, "aligner_traces_written_total")],
    ...byLabel(samples, "aligner_feedback_total", "kind").map(([k, v]) => [`feedback: ${k}`, v]),
    ...byLabel(samples, "aligner_store_errors_total", "kind").map(([k, v]) => [`store errors: ${k}`, v])]
    .filter(([, v]) => v !== undefined);
  return el("div", { class: "server-tables" },
    pairs("Responses by endpoint and status", ["Endpoint, status", "Count"], statuses),
    pairs("Errors by type", ["Type", "Count"], byLabel(samples, "aligner_errors_total", "type")) ||
      el("p", { id: "no-errors" }, "No errors since the server started."),
    pairs("Admission refusals (429)", ["Reason", "Count"], byLabel(samples, "aligner_admission_rejections_total", "reason")),
    pairs("Store", ["What", "Count"], store));
}

export class Dashboard {
  constructor(root) {
    this.root = root;
    this.status = root.querySelector("#dash-status");
    this.body = root.querySelector("#dash-body");
    root.querySelector("#refresh").addEventListener("click", () => this.refresh());
    root.querySelector("#auto-refresh").addEventListener("change", (event) => {
      clearInterval(this.timer);
      if (event.target.checked) this.timer = setInterval(() => this.refresh(), AUTO_REFRESH_MS);
    });
    this.experiments = new Experiments(root.querySelector("#experiments"));
  }

  // One refresh at a time: an auto-refresh tick while the last one (a report over a large
  // experiment) is still answering is skipped, not stacked on the server's store threads.
  async refresh() {
    if (this.refreshing) return;
    this.refreshing = true;
    try {
      await this.refreshOnce();
    } finally {
      this.refreshing = false;
    }
  }

  async refreshOnce() {
    this.status.textContent = "Loading metrics…";
    const result = await api("/metrics", { text: true });
    if (!result.ok) {
      this.status.textContent = `Cannot read /metrics (${result.error.status}): ${result.error.message}`;
      return;
    }
    const samples = parseMetrics(result.data);
    const summary = strategySummary(samples);
    clear(this.body).append(strategyTable(summary), strategyCharts(summary), serverTables(samples));
    this.status.textContent = `Updated ${new Date().toLocaleTimeString()}.`;
    await this.experiments.refresh();
  }
}
