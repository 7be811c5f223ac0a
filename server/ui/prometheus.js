// Reading GET /metrics (Prometheus' text format) in the browser: samples, histogram quantiles
// by linear interpolation within a bucket (as PromQL's histogram_quantile), and the
// per-strategy summary the dashboard shows.

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

function number(text) {
  if (text === "+Inf" || text === "Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text);
}

function unescape(value) {
  return value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
}

// [{name, labels: {..}, value}] for every sample line; comments and blank lines skipped.
export function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(SAMPLE);
    if (!match) continue;
    const labels = {};
    for (const [, name, value] of (match[2] || "").matchAll(LABEL)) labels[name] = unescape(value);
    samples.push({ name: match[1], labels, value: number(match[3]) });
  }
  return samples;
}

// The q-quantile (0..1) of a histogram given as cumulative buckets [{le, count}] (+Inf
// included). Within a bucket observations are taken as spread evenly; a rank in the +Inf
// bucket gives the highest finite bound. NaN when the histogram is empty.
export function histogramQuantile(q, buckets) {
  const sorted = [...buckets].sort((a, b) => a.le - b.le);
  const total = sorted.length ? sorted.at(-1).count : 0;
  if (!total) return NaN;
  const rank = q * total;
  const i = sorted.findIndex((b) => b.count >= rank);
  if (sorted[i].le === Infinity) return i > 0 ? sorted[i - 1].le : NaN;
  const lower = i > 0 ? sorted[i - 1].le : 0;
  const below = i > 0 ? sorted[i - 1].count : 0;
  const inBucket = sorted[i].count - below;
  if (inBucket <= 0) return sorted[i].le;
  return lower + (sorted[i].le - lower) * ((rank - below) / inBucket);
}

function sumWhere(samples, name, match = {}) {
  return samples
    .filter((s) => s.name === name && Object.entries(match).every(([k, v]) => s.labels[k] === v))
    .reduce((total, s) => total + s.value, 0);
}

function buckets(samples, name, strategy) {
  return samples
    .filter((s) => s.name === `${name}_bucket` && s.labels.strategy === strategy)
    .map((s) => ({ le: number(s.labels.le), count: s.value }));
}

export const QUANTILES = [0.5, 0.9, 0.99];

// One row per strategy that answered: requests, time to first token and latency quantiles
// (seconds), tokens and candidates per request, fallbacks and budget stops.
export function strategySummary(samples) {
  const names = new Set(samples
    .filter((s) => s.name.startsWith("aligner_") && s.labels.strategy !== undefined)
    .map((s) => s.labels.strategy));
  return [...names].sort().map((strategy) => {
    const match = { strategy };
    const requests = sumWhere(samples, "aligner_request_seconds_count", match);
    const ttft = buckets(samples, "aligner_time_to_first_token_seconds", strategy);
    const latency = buckets(samples, "aligner_request_seconds", strategy);
    const candidates = sumWhere(samples, "aligner_candidates_per_request_count", match);
    return {
      strategy,
      requests,
      ttft: Object.fromEntries(QUANTILES.map((q) => [q, histogramQuantile(q, ttft)])),
      latency: Object.fromEntries(QUANTILES.map((q) => [q, histogramQuantile(q, latency)])),
      meanLatency: requests ? sumWhere(samples, "aligner_request_seconds_sum", match) / requests : NaN,
      tokensPerRequest: requests ? sumWhere(samples, "aligner_generated_tokens_total", match) / requests : NaN,
      candidatesPerRequest: candidates ? sumWhere(samples, "aligner_candidates_per_request_sum", match) / candidates : NaN,
      fallbacks: sumWhere(samples, "aligner_fallbacks_total", match),
      budgetStops: sumWhere(samples, "aligner_budget_exhausted_total", match),
    };
  });
}

// Totals by one label of one counter, e.g. errors by type: [[label, value], ...], zeros left out.
export function byLabel(samples, name, label) {
  const totals = new Map();
  for (const s of samples) {
    if (s.name !== name || !s.value) continue;
    const key = s.labels[label] ?? "";
    totals.set(key, (totals.get(key) || 0) + s.value);
  }
  return [...totals.entries()].sort((a, b) => b[1] - a[1]);
}

export function value(samples, name) {
  const found = samples.find((s) => s.name === name);
  return found ? found.value : undefined;
}
