// The dashboard: per strategy from GET /metrics (requests, time to first token and latency
// quantiles, tokens per request, fallbacks), the server's errors and store counters, and an
// experiment's arms (ratings, win rates, costs with their intervals) where the server reports them.

import { api } from "./api.js";
import { barChart } from "./charts.js";
import { clear, el, formatNumber, formatSeconds } from "./dom.js";
import { byLabel, parseMetrics, QUANTILES, strategySummary, value } from "./prometheus.js";

const AUTO_REFRESH_MS = 5000;
const pct = (q) => `p${Math.round(q * 100)}`;

// A captioned table in a box that scrolls sideways on a narrow screen (focusable, so the
// keyboard can scroll it too).
export function table(caption, headers, rows, attrs = {}) {
  return el("div", { class: "table-wrap", tabindex: 0, role: "region", "aria-label": caption },
    el("table", attrs,
      el("caption", {}, caption),
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c, i) =>
        i === 0 ? el("th", { scope: "row" }, c) : el("td", {}, c)))))));
}

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

// {value, low, high} from a report's number or interval object, whatever it calls its fields.
export function estimate(field) {
  if (typeof field === "number") return { value: field };
  if (!field || typeof field !== "object") return null;
  const pick = (...names) => names.map((n) => field[n]).find((v) => typeof v === "number");
  const found = { value: pick("mean", "value", "rate", "estimate", "win_rate"),
                  low: pick("low", "lower", "ci_low"), high: pick("high", "upper", "ci_high") };
  if (found.value === undefined && Array.isArray(field.interval)) found.value = (field.interval[0] + field.interval[1]) / 2;
  if (Array.isArray(field.interval)) [found.low, found.high] = field.interval;
  return found.value === undefined ? null : found;
}

function experimentView(report) {
  const arms = Array.isArray(report.arms) ? report.arms
    : Object.entries(report.arms || {}).map(([name, arm]) => ({ name, ...arm }));
  if (!arms.length) return el("p", {}, "This experiment has no arms with data yet.");
  const metrics = [...new Set(arms.flatMap((arm) => Object.keys(arm).filter((k) => estimate(arm[k]) && k !== "name")))];
  const cell = (e) => (e ? `${formatNumber(e.value)}${e.low !== undefined ? ` [${formatNumber(e.low)}, ${formatNumber(e.high)}]` : ""}` : "—");
  return el("div", {},
    table(`Experiment ${report.name || report.id || ""}: arms`, ["Arm", ...metrics],
      arms.map((arm) => [String(arm.name ?? arm.arm ?? "?"), ...metrics.map((m) => cell(estimate(arm[m])))])),
    el("div", { class: "charts" }, metrics.map((metric) => barChart({
      title: metric.replaceAll("_", " "), series: [metric], format: (v) => formatNumber(v),
      rows: arms.map((arm) => ({ label: String(arm.name ?? arm.arm ?? "?"),
                                 bars: [{ series: metric, ...(estimate(arm[metric]) || { value: NaN }) }] })) }))));
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
    root.querySelector("#experiment-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.showExperiment(root.querySelector("#experiment-name").value.trim());
    });
  }

  async refresh() {
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
    if (!this.listed) this.listExperiments();
  }

  async listExperiments() {
    this.listed = true;
    const result = await api("/v1/alignment/experiments");
    const names = result.ok ? (result.data.data || []).map((e) => e.name || e.id).filter(Boolean) : [];
    clear(this.root.querySelector("#experiment-names")).append(...names.map((n) => el("option", { value: n })));
  }

  async showExperiment(name) {
    const out = clear(this.root.querySelector("#experiment-body"));
    if (!name) return;
    out.append(el("p", { role: "status" }, "Loading…"));
    const result = await api(`/v1/alignment/experiments/${encodeURIComponent(name)}`);
    clear(out);
    if (!result.ok) {
      const why = result.error.status === 404 && result.error.message === "Not Found"
        ? "this server reports no experiments" : result.error.message;
      out.append(el("p", { class: "error", role: "status" }, `Cannot show ${name} (${result.error.status}): ${why}`));
      return;
    }
    out.append(experimentView(result.data));
  }
}
