// A parameter form generated from an operation's JSON schema (pydantic's output):
// types, defaults, bounds, enums, optional (anyOf null) values, descriptions, and
// validation messages shown before anything is sent.

import { h, newId } from "./dom.js";

function resolve(schema, root) {
  if (schema && schema.$ref) {
    const name = schema.$ref.split("/").pop();
    return { ...((root.$defs || {})[name] || {}), ...schema, $ref: undefined };
  }
  return schema || {};
}

/** The non-null branch of `anyOf: [X, {type: null}]`, and whether null is allowed. */
function unwrap(prop, root) {
  let p = resolve(prop, root);
  let nullable = false;
  if (Array.isArray(p.anyOf)) {
    const branches = p.anyOf.map((b) => resolve(b, root));
    nullable = branches.some((b) => b.type === "null");
    const main = branches.find((b) => b.type !== "null") || {};
    p = { ...main, title: p.title, description: p.description, default: p.default };
  }
  return { p, nullable };
}

function kindOf(p) {
  if (Array.isArray(p.enum)) return "enum";
  if (p.type === "boolean") return "boolean";
  if (p.type === "integer" || p.type === "number") return p.type;
  if (p.type === "array") return "array";
  if (p.type === "object") return "json";
  return "string";
}

function describeBounds(p) {
  const parts = [];
  if (p.minimum !== undefined) parts.push(`≥ ${p.minimum}`);
  if (p.exclusiveMinimum !== undefined) parts.push(`> ${p.exclusiveMinimum}`);
  if (p.maximum !== undefined) parts.push(`≤ ${p.maximum}`);
  if (p.exclusiveMaximum !== undefined) parts.push(`< ${p.exclusiveMaximum}`);
  if (p.not && p.not.multipleOf === 2) parts.push("odd");
  return parts.join(", ");
}

function checkNumber(value, p, kind) {
  if (kind === "integer" && !Number.isInteger(value)) return "Enter a whole number.";
  if (p.minimum !== undefined && value < p.minimum) return `Must be at least ${p.minimum}.`;
  if (p.exclusiveMinimum !== undefined && value <= p.exclusiveMinimum) return `Must be more than ${p.exclusiveMinimum}.`;
  if (p.maximum !== undefined && value > p.maximum) return `Must be at most ${p.maximum}.`;
  if (p.exclusiveMaximum !== undefined && value >= p.exclusiveMaximum) return `Must be less than ${p.exclusiveMaximum}.`;
  if (p.not && p.not.multipleOf && value % p.not.multipleOf === 0) return `Must not be a multiple of ${p.not.multipleOf}.`;
  if (p.multipleOf && value % p.multipleOf !== 0) return `Must be a multiple of ${p.multipleOf}.`;
  return null;
}

/** Parse and check one field's text; returns {value} or {error}; undefined value = omit. */
function parse(text, p, kind, nullable, required) {
  const raw = text.trim();
  if (raw === "") {
    if (required) return { error: "This is required." };
    return { value: undefined };
  }
  if (kind === "integer" || kind === "number") {
    const value = Number(raw);
    if (!isFinite(value)) return { error: "Enter a number." };
    const error = checkNumber(value, p, kind);
    return error ? { error } : { value };
  }
  if (kind === "array") {
    const items = resolve(p.items || (p.prefixItems || [])[0] || {}, {});
    const parts = raw.split(/[\s,]+/).filter(Boolean);
    const itemKind = kindOf(items);
    const values = [];
    for (const part of parts) {
      if (itemKind === "integer" || itemKind === "number") {
        const v = Number(part);
        if (!isFinite(v)) return { error: `"${part}" is not a number.` };
        const error = checkNumber(v, items, itemKind);
        if (error) return { error: `${part}: ${error}` };
        values.push(v);
      } else values.push(part);
    }
    if (p.minItems !== undefined && values.length < p.minItems) return { error: `Give at least ${p.minItems} values.` };
    if (p.maxItems !== undefined && values.length > p.maxItems) return { error: `Give at most ${p.maxItems} values.` };
    return { value: values };
  }
  if (kind === "json") {
    try {
      return { value: JSON.parse(raw) };
    } catch {
      return { error: "Enter valid JSON." };
    }
  }
  if (p.minLength !== undefined && raw.length < p.minLength) return { error: `Use at least ${p.minLength} characters.` };
  if (p.maxLength !== undefined && raw.length > p.maxLength) return { error: `Use at most ${p.maxLength} characters.` };
  if (p.pattern && !new RegExp(p.pattern).test(raw)) return { error: "This does not have the expected form." };
  return { value: raw };
}

function defaultText(p) {
  if (p.default === undefined || p.default === null) return "";
  if (Array.isArray(p.default)) return p.default.join(", ");
  if (typeof p.default === "object") return JSON.stringify(p.default);
  return String(p.default);
}

/**
 * Build the fields of `schema` into `container`. `special` maps a parameter name to a
 * function building its control instead (e.g. a model picker). Returns {collect, reset}.
 */
export function buildParams(container, schema, special = {}) {
  const fields = [];
  const required = new Set(schema.required || []);
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    const { p, nullable } = unwrap(prop, schema);
    const kind = kindOf(p);
    const id = newId(`param-${name}`);
    const helpId = `${id}-help`;
    const errorId = `${id}-error`;
    const label = p.title || name;
    const bounds = describeBounds(p);
    const help = [p.description, bounds && `(${bounds})`, kind === "array" && "Separate values with commas."]
      .filter(Boolean)
      .join(" ");
    const error = h("p", { id: errorId, class: "field-error", hidden: true });
    const isRequired = required.has(name) && !nullable;
    let control;
    if (special[name]) {
      control = special[name]({ id, p, required: isRequired });
    } else if (kind === "enum") {
      control = h(
        "select",
        { id, name },
        nullable || !isRequired ? h("option", { value: "" }, p.default === undefined || p.default === null ? "— none —" : "— default —") : null,
        p.enum.map((v) => h("option", { value: String(v), selected: v === p.default }, String(v))),
      );
      if (p.default !== undefined && p.default !== null) control.value = String(p.default);
    } else if (kind === "boolean") {
      control = h("input", { id, name, type: "checkbox", checked: p.default === true });
    } else {
      const numeric = kind === "integer" || kind === "number";
      control = h("input", {
        id,
        name,
        type: "text",
        inputmode: numeric ? (kind === "integer" ? "numeric" : "decimal") : undefined,
        value: defaultText(p),
        placeholder: nullable ? "optional" : undefined,
        autocomplete: "off",
        spellcheck: false,
      });
    }
    control.setAttribute("aria-describedby", `${helpId} ${errorId}`);
    if (isRequired) control.setAttribute("aria-required", "true");
    const field = h(
      "div",
      { class: `field field-${kind}` },
      kind === "boolean"
        ? h("div", { class: "check" }, control, h("label", { for: id }, label))
        : [h("label", { for: id }, label, isRequired ? h("span", { class: "req" }, " (required)") : null), control],
      h("p", { id: helpId, class: "help" }, help),
      error,
    );
    container.append(field);
    const entry = {
      name,
      control,
      validate() {
        let result;
        if (kind === "boolean") result = { value: control.checked };
        else if (kind === "enum") {
          const v = control.value;
          result = v === "" ? { value: undefined } : { value: p.enum.find((e) => String(e) === v) };
        } else result = parse(control.value, p, kind, nullable, isRequired);
        error.hidden = !result.error;
        error.textContent = result.error || "";
        control.setAttribute("aria-invalid", result.error ? "true" : "false");
        return result;
      },
    };
    control.addEventListener("blur", () => entry.validate());
    control.addEventListener("input", () => {
      if (control.getAttribute("aria-invalid") === "true") entry.validate();
    });
    fields.push(entry);
  }
  if (!fields.length) container.append(h("p", { class: "muted" }, "This operation has no parameters."));
  return {
    /** {params, firstInvalid}: values that differ from nothing are sent; defaults apply on the server. */
    collect() {
      const params = {};
      let firstInvalid = null;
      for (const f of fields) {
        const r = f.validate();
        if (r.error) firstInvalid = firstInvalid || f.control;
        else if (r.value !== undefined) params[f.name] = r.value;
      }
      return { params, firstInvalid };
    },
    field(name) {
      return fields.find((f) => f.name === name);
    },
  };
}
