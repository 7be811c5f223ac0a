// A form for one JSON schema object (a strategy's parameters, as GET /v1/alignment/strategies
// gives them) and its values read back. Only values that differ from the schema's default are
// sent: the server fills in the rest and reports them in `alignment.params`.

import { el } from "./dom.js";

function variants(prop) {
  return (prop.anyOf || [prop]).filter((v) => v.type !== "null");
}

function nullable(prop) {
  return (prop.anyOf || []).some((v) => v.type === "null");
}

// What input a property gets: boolean, integer, number, enum, string, list, reward, json.
export function fieldKind(prop) {
  const options = variants(prop);
  const types = options.map((v) => v.type);
  if (options.length > 1) return types.includes("string") && types.includes("object") ? "reward" : "json";
  const only = options[0] || {};
  if (only.enum) return "enum";
  if (only.type === "array" && only.items && only.items.type === "string") return "list";
  if (["boolean", "integer", "number", "string"].includes(only.type)) return only.type;
  return "json";
}

function bounds(prop) {
  const only = variants(prop)[0] || {};
  const out = {};
  if (only.minimum !== undefined) out.min = only.minimum;
  else if (only.exclusiveMinimum !== undefined) out.min = only.exclusiveMinimum;
  if (only.maximum !== undefined) out.max = only.maximum;
  else if (only.exclusiveMaximum !== undefined) out.max = only.exclusiveMaximum;
  return out;
}

function describe(prop) {
  const parts = [];
  if (prop.description) parts.push(prop.description);
  if (prop.default !== undefined && prop.default !== null) parts.push(`default ${JSON.stringify(prop.default)}`);
  return parts.join("; ");
}

function input(kind, prop, id, hints) {
  const value = prop.default;
  if (kind === "boolean") return el("input", { id, type: "checkbox", checked: value === true });
  if (kind === "integer" || kind === "number") {
    return el("input", { id, type: "number", step: kind === "integer" ? "1" : "any", inputmode: "decimal",
                         value: value ?? "", placeholder: value == null ? "default" : "", ...bounds(prop) });
  }
  if (kind === "enum") {
    const options = (variants(prop)[0].enum || []).map((v) => el("option", { value: v, selected: v === value }, v));
    if (nullable(prop)) options.unshift(el("option", { value: "", selected: value == null }, "(default)"));
    return el("select", { id }, options);
  }
  if (kind === "list") return el("textarea", { id, rows: 2, placeholder: "one per line" }, (value || []).join("\n"));
  const attrs = { id, type: "text", value: value == null ? "" : typeof value === "string" ? value : JSON.stringify(value) };
  if (kind === "reward") {
    attrs.placeholder = "name, or name=weight, name=weight";
    if (hints.rewardList) attrs.list = hints.rewardList;
  } else if (kind === "json") {
    attrs.placeholder = "JSON";
  }
  return el("input", attrs);
}

// "helpful" -> "helpful"; "a=1, b=0.5" -> {a: 1, b: 0.5}; "{...}" -> the JSON object.
export function parseReward(text) {
  const given = text.trim();
  if (given.startsWith("{")) return JSON.parse(given);
  if (!given.includes("=") && !given.includes(",")) return given;
  const weights = {};
  for (const part of given.split(",").map((p) => p.trim()).filter(Boolean)) {
    const [name, weight] = part.split("=").map((p) => p.trim());
    const number = weight === undefined ? 1 : Number(weight);
    if (!name || Number.isNaN(number)) throw new Error(`cannot read ${JSON.stringify(part)} as name=weight`);
    weights[name] = number;
  }
  return weights;
}

function readField(kind, node) {
  if (kind === "boolean") return node.checked;
  const text = node.value.trim();
  if (text === "") return undefined;
  if (kind === "integer" || kind === "number") {
    const number = Number(text);
    if (Number.isNaN(number) || (kind === "integer" && !Number.isInteger(number))) {
      throw new Error(`${JSON.stringify(text)} is not ${kind === "integer" ? "a whole number" : "a number"}`);
    }
    return number;
  }
  if (kind === "list") return text.split("\n").map((l) => l.trim()).filter(Boolean);
  if (kind === "reward") return parseReward(text);
  if (kind === "json") return JSON.parse(text);
  return text;
}

// Fill `container` with one labelled field per property; returns {read, set}: read() gives
// {values, errors} with only the changed values, set(values) fills fields in (names it knows).
export function buildForm(schema, container, prefix, hints = {}) {
  const fields = [];
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    const kind = fieldKind(prop);
    const id = `${prefix}-${name}`;
    const node = input(kind, prop, id, hints);
    const help = describe(prop);
    if (help) {
      node.setAttribute("aria-describedby", `${id}-help`);
    }
    const label = el("label", { for: id }, name);
    const wrapper = el("div", { class: `field field-${kind}`, "data-param": name },
      kind === "boolean" ? [node, label] : [label, node],
      help ? el("small", { id: `${id}-help`, class: "hint" }, help) : null);
    container.append(wrapper);
    fields.push({ name, kind, node, prop });
  }
  return {
    read() {
      const values = {};
      const errors = [];
      for (const { name, kind, node, prop } of fields) {
        try {
          const value = readField(kind, node);
          if (value !== undefined && JSON.stringify(value) !== JSON.stringify(prop.default)) values[name] = value;
        } catch (exc) {
          errors.push(`${name}: ${exc.message}`);
        }
      }
      return { values, errors };
    },
    set(values) {
      for (const { name, kind, node } of fields) {
        if (!(name in values)) continue;
        const value = values[name];
        if (kind === "boolean") node.checked = Boolean(value);
        else if (kind === "list") node.value = (value || []).join("\n");
        else node.value = typeof value === "object" && value !== null ? JSON.stringify(value) : String(value);
      }
    },
  };
}
