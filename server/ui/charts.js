// Plain SVG charts: horizontal bars, grouped by row, each bar optionally with an interval
// (whiskers from low to high). They scale with their box (viewBox), so they read on a phone,
// and each carries a text description for screen readers; the tables beside them hold the numbers.

const SVG = "http://www.w3.org/2000/svg";
const ROW = 22;
const LABEL_WIDTH = 130;
const WIDTH = 560;
const PAD = 8;

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// rows: [{label, bars: [{series, value, low?, high?}]}]; series: names in legend order.
// Returns a <figure> with the chart, a legend and a caption.
export function barChart({ title, rows, series, format = (v) => String(v) }) {
  const figure = document.createElement("figure");
  figure.className = "chart";
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  const values = rows.flatMap((r) => r.bars.flatMap((b) => [b.value, b.high ?? b.value]))
    .filter((v) => Number.isFinite(v));
  const max = Math.max(...values, 0) || 1;
  const barsPerRow = series.length;
  const rowHeight = ROW * barsPerRow + PAD;
  const height = rows.length * rowHeight + PAD;
  const plot = WIDTH - LABEL_WIDTH - 70;
  const scale = (v) => (Math.max(0, v) / max) * plot;
  const described = rows.map((r) => `${r.label}: ${r.bars.map((b) => `${b.series} ${format(b.value)}`).join(", ")}`);
  const root = svg("svg", { viewBox: `0 0 ${WIDTH} ${Math.max(height, ROW)}`, role: "img",
                            "aria-label": `${title}. ${described.join("; ")}` });
  root.append(svg("title", {}, title));
  rows.forEach((row, r) => {
    const top = PAD + r * rowHeight;
    root.append(svg("text", { x: 0, y: top + (ROW * barsPerRow) / 2 + 4, class: "chart-label" }, row.label));
    row.bars.forEach((bar) => {
      const s = series.indexOf(bar.series);
      const y = top + s * ROW;
      if (!Number.isFinite(bar.value)) {
        root.append(svg("text", { x: LABEL_WIDTH, y: y + 14, class: "chart-value" }, "no data"));
        return;
      }
      root.append(svg("rect", { x: LABEL_WIDTH, y: y + 2, width: Math.max(scale(bar.value), 1), height: ROW - 6,
                                class: `chart-bar series-${s}` }));
      let end = LABEL_WIDTH + scale(bar.value);
      if (Number.isFinite(bar.low) && Number.isFinite(bar.high)) {
        const mid = y + ROW / 2 - 1;
        const [lo, hi] = [LABEL_WIDTH + scale(bar.low), LABEL_WIDTH + scale(bar.high)];
        root.append(svg("line", { x1: lo, x2: hi, y1: mid, y2: mid, class: "chart-interval" }),
          svg("line", { x1: lo, x2: lo, y1: mid - 5, y2: mid + 5, class: "chart-interval" }),
          svg("line", { x1: hi, x2: hi, y1: mid - 5, y2: mid + 5, class: "chart-interval" }));
        end = Math.max(end, hi);
      }
      root.append(svg("text", { x: end + 4, y: y + 14, class: "chart-value" }, format(bar.value)));
    });
  });
  figure.append(caption, root);
  if (series.length < 2) return figure;  // the caption names the one series
  const legend = document.createElement("p");
  legend.className = "chart-legend";
  legend.setAttribute("aria-hidden", "true");
  series.forEach((name, s) => {
    const key = svg("svg", { viewBox: "0 0 10 10", class: "legend-key" });
    key.append(svg("rect", { width: 10, height: 10, class: `chart-bar series-${s}` }));
    const item = document.createElement("span");
    item.append(key, ` ${name} `);
    legend.append(item);
  });
  figure.append(legend);
  return figure;
}
