// Building DOM nodes without a framework. Text always goes in as text, never as HTML: answers
// and error messages come from a model and a server, and are shown exactly as sent.

const PROPERTIES = new Set(["checked", "selected", "value", "disabled", "hidden"]);

// el("button", {type: "button", on: {click: f}}, "Send"); children may be nodes, strings,
// arrays of them, or null (skipped).
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "on") {
      for (const [event, handler] of Object.entries(value)) node.addEventListener(event, handler);
    } else if (PROPERTIES.has(name)) {
      node[name] = value;
    } else if (value !== undefined && value !== null && value !== false) {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
}

export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

// "0.990", "-0.020", "—" for a missing score; the exact value travels in data-value.
export function formatNumber(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  return Number(value).toFixed(digits);
}

export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}

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
