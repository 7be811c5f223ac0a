// The dashboard's experiments: the profiles file's experiments (GET /v1/alignment/experiments)
// and one's report from the store (GET /v1/alignment/experiments/{name}): per arm its requests,
// rating, win rate, reward, tokens and latency with 95% intervals, and each arm against the first;
// the sample-ratio check of the split (or, for a router's experiment, why its arms are not
// comparable) and the count of repeated judgements ignored.

import { api } from "./api.js";
import { barChart } from "./charts.js";
import { clear, el, formatNumber, formatSeconds, table } from "./dom.js";

const interval = (ci, format) => (Number.isFinite(ci?.[0]) && Number.isFinite(ci?.[1])
  ? ` [${format(ci[0])}, ${format(ci[1])}]` : "");

// "0.750 [0.412, 0.950]" for {mean, ci95}; "—" without data.
function estimateCell(estimate, format = formatNumber) {
  if (!estimate || estimate.mean === null || estimate.mean === undefined) return "—";
  return `${format(estimate.mean)}${interval(estimate.ci95, format)}`;
}

function winCell(win) {
  if (!win || !win.n) return "—";
  return `${formatNumber(win.rate, 2)}${interval(win.ci95, (v) => formatNumber(v, 2))} (${win.wins} of ${win.n})`;
}

function latencyCell(latency, name) {
  const part = latency?.[name];
  if (!part || part.value === null || part.value === undefined) return "—";
  return `${formatSeconds(part.value)}${interval(part.ci95, formatSeconds)}`;
}

function differenceCell(test, format = formatNumber) {
  if (!test || test.difference === null || test.difference === undefined) return "—";
  const p = test.p_value === null || test.p_value === undefined ? "" : `, p ${formatNumber(test.p_value, 3)}`;
  return `${test.difference >= 0 ? "+" : ""}${format(test.difference)}${interval(test.ci95, format)}${p}`;
}

// A chart bar from a {mean, ci95} (or {value, ci95}, or a win rate's {rate, ci95}).
function bar(series, estimate) {
  const value = estimate?.mean ?? estimate?.value ?? estimate?.rate;
  const [low, high] = estimate?.ci95 || [];
  return { series, value: value ?? NaN, low: low ?? undefined, high: high ?? undefined };
}

// The sample-ratio check (are units split as the weights say?) and the repeats ignored.
function checksView(report) {
  const lines = [];
  const srm = report.sample_ratio;
  if (srm) {
    const units = Object.entries(srm.units).map(([arm, n]) => `${arm} ${n}`).join(", ");
    const text = `Sample ratio: ${units} units; chi-square ${formatNumber(srm.chi2, 2)} (df ${srm.df}), `
      + `p ${formatNumber(srm.p_value, 4)} against the configured weights`;
    lines.push(srm.mismatch
      ? el("p", { class: "error sample-ratio" }, `${text}: MISMATCH (p < ${srm.threshold}). The split does not `
        + "follow the weights (a sticky arm from earlier weights, lost traces, a broken assignment): "
        + "do not read the comparison until it is explained.")
      : el("p", { class: "muted sample-ratio" }, `${text}: no mismatch.`));
  }
  const experiment = report.experiment || {};
  if (experiment.unit === "router") {
    lines.push(el("p", { class: "muted router-note" }, `Each request's arm is chosen by the learned router `
      + `${experiment.router} (at least ${Math.round((experiment.explore ?? 0) * 100)}% spread evenly): the arms answer `
      + "different requests, so these per-arm numbers and comparisons are not a randomized comparison. Compare "
      + "policies with the router card's offline estimates (aligner train-router)."));
  }
  if (report.repeats_ignored) {
    lines.push(el("p", { class: "muted repeats" }, `${report.repeats_ignored} repeated judgement(s) ignored: `
      + "one per user, answer and kind counts, the latest."));
  }
  return lines;
}

export function reportView(report) {
  const arms = report.arms || [];
  if (!arms.length) return el("p", {}, "No arm has answered yet.");
  const share = (a) => (a.share === null || a.share === undefined ? "—" : `${Math.round(a.share * 100)}%`);
  const armsTable = table(`${report.name}: arms (${report.requests} requests)`,
    ["Arm", "Requests", "Share", "Ratings", "Rating (0-1)", "Win rate", "Reward", "Tokens", "Latency p50", "Latency p95"],
    arms.map((a) => [a.arm, String(a.requests), share(a), String(a.rating?.n ?? 0), estimateCell(a.rating), winCell(a.win_rate),
      estimateCell(a.reward), estimateCell(a.completion_tokens, (v) => formatNumber(v, 1)),
      latencyCell(a.latency_s, "p50"), latencyCell(a.latency_s, "p95")]),
    { class: "experiment-arms" });
  const chart = (title, pick, format = formatNumber) => barChart({
    title, series: [title], format, rows: arms.map((a) => ({ label: a.arm, bars: [bar(title, pick(a))] })) });
  const comparisons = (report.comparisons || []).length ? table(`Against ${report.arms[0].arm}`,
    ["Arm", "Rating", "Reward", "Tokens", "Latency", "Preferred in pairs"],
    report.comparisons.map((c) => [c.arm, differenceCell(c.rating), differenceCell(c.reward),
      differenceCell(c.completion_tokens, (v) => formatNumber(v, 1)), differenceCell(c.latency_s, formatSeconds),
      c.win_rate?.n ? `${winCell(c.win_rate)}, p ${formatNumber(c.win_rate.p_value, 3)}` : "—"])) : null;
  return el("div", { class: "experiment-report" }, armsTable, ...checksView(report), comparisons,
    el("div", { class: "charts" },
      chart("Rating (0-1)", (a) => a.rating, (v) => formatNumber(v, 2)),
      chart("Win rate", (a) => a.win_rate, (v) => formatNumber(v, 2)),
      chart("Tokens per answer", (a) => a.completion_tokens, (v) => formatNumber(v, 1)),
      chart("Latency p50", (a) => a.latency_s?.p50, formatSeconds)));
}

export class Experiments {
  constructor(root) {
    this.root = root;
    this.choice = root.querySelector("#experiment-name");
    this.body = root.querySelector("#experiment-body");
    root.querySelector("#experiment-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.show(this.choice.value);
    });
  }

  // Re-read the list of experiments and show the chosen one (the first at the start).
  async refresh() {
    const listed = await api("/v1/alignment/experiments");
    const names = listed.ok ? (listed.data.data || []).map((e) => e.name) : [];
    const chosen = names.includes(this.choice.value) ? this.choice.value : names[0];
    clear(this.choice).append(...names.map((n) => el("option", { value: n, selected: n === chosen }, n)));
    this.root.querySelector("#experiment-form").hidden = !names.length;
    if (!names.length) {
      clear(this.body).append(el("p", { class: "muted" }, listed.ok
        ? "This server's profiles file defines no experiments."
        : `Experiments are not available (${listed.error.status}): ${listed.error.message}`));
      return;
    }
    await this.show(chosen);
  }

  async show(name) {
    const result = await api(`/v1/alignment/experiments/${encodeURIComponent(name)}`);
    clear(this.body);
    if (!result.ok) {
      this.body.append(el("p", { class: "error" }, `Cannot show ${name} (${result.error.status}): ${result.error.message}`));
      return;
    }
    this.body.append(reportView(result.data));
  }
}
