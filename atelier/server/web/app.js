// atelier's web page: the schema from GET /v1/schema, one picker per attribute group, results from
// POST /v1/generate-and-retrieve and /v1/retrieve-similar. The query lives in the address bar, so a
// link runs it again: ?category=Dress&seed=3&model=cvae&topK=8&filter.category=Dress (a group named
// like a parameter is attr.NAME), and like=ID for "more like this" (edit=1: changed to the description).
// Whatever the link says is sent as it is, so the server's own message tells what is not allowed.
"use strict";

const PARAMS = new Set(["model", "topK", "numSamples", "seed", "like", "edit"]);
const TOKEN_KEY = "atelier-token";
const $ = (id) => document.getElementById(id);
let schema = null;

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else node[key] = value;
  }
  node.append(...children);
  return node;
}

async function api(path, body) {
  const headers = { "Content-Type": "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const init = body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(data && data.error ? data.error.message : `HTTP ${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

// --- the form -------------------------------------------------------------------------------

const attrKey = (name) => (PARAMS.has(name) || name.includes(".") ? "attr." + name : name);
const currentModel = () => (schema.models || []).find((m) => m.name === $("model").value) || {};

function picker(group, id, anyOption) {
  const values = group.values || [];
  const select = el("select", { id, name: id, multiple: !!group.multiLabel });
  if (group.multiLabel) select.size = Math.min(5, Math.max(2, values.length));
  if (anyOption) select.append(el("option", { value: "" }, anyOption));
  for (const value of values) select.append(el("option", { value }, value === "" ? "(no value)" : value));
  return el("label", {}, group.name, select);
}

function buildForm(kept) {
  // the "any" choice depends on the model: rebuilt when it changes, keeping the picks in `kept`
  const groups = schema.groups || [];
  const partial = !!currentModel().acceptsPartial;
  $("attributes").replaceChildren(el("legend", {}, "Describe it"),
    ...groups.map((g) => picker(g, "attr." + g.name, !g.multiLabel && partial ? "any" : null)));
  const filters = schema.filterGroups || [];
  $("filters").replaceChildren(...filters.map((g) => picker({ ...g, multiLabel: true, values: [...(g.values || []), ""] },
    "filter." + g.name, null)));
  $("filters-box").hidden = filters.length === 0;
  setForm(kept, true);
}

function selected(select) {
  return select ? [...select.selectedOptions].map((o) => o.value) : [];
}

function formParams() {
  const params = new URLSearchParams();
  for (const g of schema.groups || []) {
    for (const value of selected($("attr." + g.name))) if (value !== "") params.append(attrKey(g.name), value);
  }
  for (const id of ["model", "topK", "numSamples", "seed"]) if ($(id).value.trim()) params.set(id, $(id).value.trim());
  for (const g of schema.filterGroups || []) {
    for (const value of selected($("filter." + g.name))) params.append("filter." + g.name, value);
  }
  if ($("edit").checked) params.set("edit", "1");
  return params;
}

function setForm(params, attributesOnly = false) {
  for (const g of schema.groups || []) setSelected($("attr." + g.name), params.getAll(attrKey(g.name)));
  for (const g of schema.filterGroups || []) setSelected($("filter." + g.name), params.getAll("filter." + g.name));
  if (attributesOnly) return;
  $("model").value = params.get("model") || schema.defaultModel || "";
  for (const id of ["topK", "numSamples", "seed"]) $(id).value = params.get(id) || "";
  $("edit").checked = params.has("edit");
  $("filters-box").open ||= [...params.keys()].some((k) => k.startsWith("filter."));
}

function setSelected(select, values) {
  if (!select) return;
  for (const option of select.options) option.selected = values.includes(option.value);
  if (!select.multiple && values.length === 0 && select.options.length) select.selectedIndex = 0;
}

// --- the request, from the query string ---------------------------------------------------------

function request(params) {
  const attributes = {}, filters = {};
  for (const [key, value] of params) {
    const [map, name] = key.startsWith("filter.") ? [filters, key.slice(7)]
      : key.startsWith("attr.") ? [attributes, key.slice(5)] : PARAMS.has(key) ? [null] : [attributes, key];
    if (map) (map[name] ||= { values: [] }).values.push(value);
  }
  const common = { returnImages: true, returnThumbnails: Number(schema.index?.thumbnailSize || 0) > 0, filters };
  if (params.get("topK")) common.topK = params.get("topK");
  if (params.has("like")) {
    const edit = params.has("edit") ? { changes: attributes, model: params.get("model") || "" } : {};
    return ["/v1/retrieve-similar", { productId: params.get("like"), ...edit, ...common }];
  }
  const body = { attributes, model: params.get("model") || "", ...common };
  if (params.get("numSamples")) body.numSamples = params.get("numSamples");
  if (params.get("seed")) body.seed = params.get("seed");
  return ["/v1/generate-and-retrieve", body];
}

async function run(params, how) {
  const [path, body] = request(params);
  document.body.dataset.state = "loading";
  showError(null);
  $("go").disabled = $("more").disabled = true;
  $("summary").textContent = params.has("like") ? `Finding products like ${params.get("like")}` : "Drawing";
  $("drawings").replaceChildren();
  $("products").replaceChildren();
  try {
    const response = await api(path, body);
    if (!params.has("like") && response.seed) params.set("seed", response.seed);
    render(response, params);
    document.body.dataset.state = "done";
  } catch (error) {
    showError(error);
    $("summary").textContent = "";
    document.body.dataset.state = "error";
  } finally {
    $("go").disabled = $("more").disabled = false;
    document.body.dataset.runs = String(Number(document.body.dataset.runs) + 1);
  }
  const url = "?" + params.toString();
  if (how === "push") history.pushState(null, "", url);
  else if (how === "replace") history.replaceState(null, "", url);
  $("share").href = url;
  if (params.get("seed")) $("seed").value = params.get("seed");
}

function showError(error) {
  $("error").hidden = !error;
  $("error").textContent = error ? `${error.status ? error.status + ": " : ""}${error.message}` : "";
  if (error && error.status === 401) $("auth").hidden = false;
}

// --- the answer ---------------------------------------------------------------------------------

function dataUrl(base64) {
  const kind = base64.startsWith("/9j/") ? "jpeg" : "png"; // JPEG's signature FF D8 FF, else PNG
  return `data:image/${kind};base64,${base64}`;
}

function render(response, params) {
  const images = response.images || [], products = response.products || [];
  $("drawings-title").textContent = params.has("like") ? "Edited drawing" : "Drawings";
  $("drawings").replaceChildren(...images.map((im, i) => el("img", { src: dataUrl(im.png), alt: `drawing ${i + 1}`,
    className: "drawing", title: `${im.width}x${im.height}` })));
  $("drawings-box").hidden = images.length === 0;
  $("products").replaceChildren(...products.map(card));
  $("products-box").hidden = false;
  const what = params.has("like") ? `like ${params.get("like")}` : `seed ${response.seed || 0}`;
  $("summary").textContent = `${products.length} products ${what}` + (response.model ? ` · model ${response.model}` : "");
}

function card(product) {
  const li = el("li", { className: "product", dataset: { id: product.id } });
  const link = /^https?:\/\//i.test(product.imageUri || "") ? product.imageUri : null;
  if (product.thumbnail) {
    const img = el("img", { src: dataUrl(product.thumbnail), alt: product.id, className: "thumb" });
    li.append(link ? el("a", { href: link, target: "_blank", rel: "noopener noreferrer" }, img) : img);
  } else if (link) {
    li.append(el("a", { href: link, target: "_blank", rel: "noopener noreferrer" }, "photo"));
  }
  const attributes = el("dl");
  for (const [group, v] of Object.entries(product.attributes || {})) {
    attributes.append(el("dt", {}, group), el("dd", {}, (v.values || []).join(", ") || "-"));
  }
  li.append(el("div", { className: "id" }, product.id), el("div", { className: "score" }, `score ${(product.score || 0).toFixed(3)}`),
    attributes, el("button", { type: "button", className: "like", onclick: () => like(product.id) }, "More like this"));
  return li;
}

function like(id) {
  const params = formParams();
  params.delete("seed");
  params.set("like", id);
  run(params, "push");
}

// --- start --------------------------------------------------------------------------------------

async function start() {
  document.body.dataset.state = "starting";
  try {
    schema = await api("/v1/schema");
  } catch (error) {
    showError(error);
    document.body.dataset.state = "error";
    return;
  }
  showError(null);
  $("auth").hidden = true;
  const index = schema.index || {};
  $("index-info").textContent = `${Number(index.count || 0).toLocaleString("en")} products of ${index.catalogue || "?"}` +
    ` · index ${index.version || "?"} · embedder ${index.embedder || "?"}`;
  $("model").replaceChildren(...(schema.models || []).map((m) => el("option", { value: m.name }, `${m.name} (${m.family})`)));
  const limits = schema.limits || {};
  $("topK").placeholder = limits.defaultTopK || "";
  $("numSamples").placeholder = limits.defaultNumSamples || "";
  const params = new URLSearchParams(location.search);
  setForm(params);
  buildForm(params);
  document.body.dataset.state = "ready";
  if ([...params.keys()].length) run(params, "replace");
}

$("query").addEventListener("submit", (event) => {
  event.preventDefault();
  run(formParams(), "push");
});
$("more").addEventListener("click", () => {
  $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
  run(formParams(), "push");
});
$("model").addEventListener("change", () => buildForm(formParams()));
$("use-token").addEventListener("click", () => {
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  start();
});
window.addEventListener("popstate", () => {
  const params = new URLSearchParams(location.search);
  setForm(params);
  if ([...params.keys()].length) run(params, null);
});
start();
