// MixT5 serve page: ask a question, show the answer and the routing. Plain JS, no libraries, no network beyond this server.
"use strict";

const PALETTE = ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"];
const state = { health: null, routing: null, layer: null };
const $ = (id) => document.getElementById(id);

function expertColour(expert) {
  if (expert < PALETTE.length) return PALETTE[expert];
  return `hsl(${(expert * 137.508) % 360}, 60%, 78%)`; // golden angle: well-spread hues for many experts
}

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    let detail = body.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return body;
}

async function loadInfo() {
  try {
    const health = await getJSON("/healthz");
    state.health = health;
    const moe = health.num_moe_layers
      ? `${health.num_moe_layers} MoE layers × ${health.num_experts} experts (top-${health.top_k})`
      : "dense (no MoE layers)";
    const beams = health.generation.num_beams;
    const decoding = beams > 1 ? `${beams} beams` : "greedy";
    $("model-info").textContent =
      `${health.model} · ${moe} · ${health.device} · ${decoding} up to ${health.generation.max_length} tokens`;
  } catch (err) {
    $("model-info").textContent = `model information unavailable (${err.message})`;
  }
  try {
    const examples = await getJSON("/v1/examples");
    const select = $("example");
    examples.forEach((example, index) => {
      const label = `${index + 1}. ${example.title.replaceAll("_", " ")}: ${example.question}`;
      select.append(el("option", { value: String(index), textContent: label }));
    });
    select.addEventListener("change", () => {
      const example = examples[Number(select.value)];
      if (!select.value || !example) return;
      $("context").value = example.context;
      $("question").value = example.question;
    });
  } catch (err) {
    showError(`could not load the examples (${err.message})`);
  }
}

async function ask(event) {
  event.preventDefault();
  showError("");
  const button = $("submit");
  button.disabled = true;
  document.body.dataset.state = "asking";
  try {
    const result = await getJSON("/v1/answer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ question: $("question").value, context: $("context").value }),
    });
    $("answer").textContent = result.answer || "(empty answer)";
    renderRouting(result.routing);
    document.body.dataset.state = "answered";
  } catch (err) {
    $("answer").textContent = "";
    showError(err.message);
    document.body.dataset.state = "error";
  } finally {
    button.disabled = false;
  }
}

function allLayers(routing) {
  return [...routing.encoder, ...routing.decoder];
}

function renderRouting(routing) {
  const layers = routing ? allLayers(routing) : [];
  $("routing").hidden = layers.length === 0;
  const note = $("no-moe");
  note.hidden = layers.length > 0;
  note.textContent = routing
    ? "This model has no MoE layers: there is no routing to show."
    : "Routing is shown for greedy decoding only (this server decodes with beams).";
  if (!layers.length) return;
  state.routing = routing;
  if (!layers.some((layer) => layer.layer === state.layer)) state.layer = layers[0].layer;
  const select = $("layer");
  select.replaceChildren();
  for (const [stack, title] of [["encoder", "Encoder (input tokens)"], ["decoder", "Decoder (answer tokens)"]]) {
    if (!routing[stack].length) continue;
    const group = el("optgroup", { label: title });
    for (const layer of routing[stack]) group.append(el("option", { value: layer.layer, textContent: layer.layer }));
    select.append(group);
  }
  select.value = state.layer;
  renderLayer();
}

function numExperts() {
  if (state.health && state.health.num_experts) return state.health.num_experts;
  let top = 0;
  for (const layer of allLayers(state.routing)) for (const experts of layer.experts) for (const e of experts) top = Math.max(top, e + 1);
  return top;
}

function expertLoad(layer, count) {
  const load = new Array(count).fill(0);
  let total = 0;
  for (const experts of layer.experts) {
    for (const e of experts) {
      load[e] += 1;
      total += 1;
    }
  }
  return load.map((n) => (total ? n / total : 0));
}

function renderLayer() {
  const layers = allLayers(state.routing);
  const layer = layers.find((l) => l.layer === state.layer);
  const count = numExperts();
  const isEncoder = layer.layer.startsWith("encoder");
  $("routing-caption").textContent =
    `${isEncoder ? "Input" : "Answer"} tokens of ${layer.layer}, coloured by their top-1 expert (hover for all experts and weights).`;

  $("legend").replaceChildren(
    ...Array.from({ length: count }, (_, e) =>
      el("span", {}, [el("span", { className: "swatch", style: `background:${expertColour(e)}` }), `expert ${e}`]),
    ),
  );

  const tokens = layer.tokens.map((token, i) => {
    const experts = layer.experts[i];
    const weights = layer.weights[i];
    const top = experts.length ? experts[0] : null;
    const shown = token.replace(/^\u2581/, "") || "\u2423";
    const title = experts.length
      ? experts.map((e, j) => `expert ${e}: ${weights[j].toFixed(2)}`).join(", ")
      : "no expert (dropped by capacity)";
    return el("span", {
      className: "token",
      textContent: shown,
      title: `${token} \u2192 ${title}`,
      style: top === null ? "background:#fff;outline:1px dashed #999" : `background:${expertColour(top)}`,
    });
  });
  tokens.forEach((node, i) => (node.dataset.expert = String(layer.experts[i][0] ?? "")));
  $("tokens").replaceChildren(...tokens);

  const loads = layers.map((l) => expertLoad(l, count));
  const scale = Math.max(1 / count, ...loads.flat());
  const boxes = layers.map((l, index) => {
    const bars = el("div", { className: "bars" }, [
      el("div", { className: "even-line", style: `bottom:${(64 * (1 / count)) / scale}px` }),
      ...loads[index].map((share, e) =>
        el("div", {
          className: "bar",
          title: `${l.layer}, expert ${e}: ${(100 * share).toFixed(1)}%`,
          style: `height:${(64 * share) / scale}px;background:${expertColour(e)}`,
        }),
      ),
    ]);
    const ids = el("div", { className: "bar-ids" }, loads[index].map((_, e) => el("span", { textContent: String(e) })));
    const box = el("div", { className: `load-layer${l.layer === state.layer ? " selected" : ""}` }, [
      bars,
      ids,
      el("div", { className: "name", textContent: l.layer }),
    ]);
    box.dataset.layer = l.layer;
    box.addEventListener("click", () => selectLayer(l.layer));
    return box;
  });
  $("loads").replaceChildren(...boxes);
}

function selectLayer(name) {
  state.layer = name;
  $("layer").value = name;
  renderLayer();
}

document.addEventListener("DOMContentLoaded", () => {
  $("qa-form").addEventListener("submit", ask);
  $("layer").addEventListener("change", (event) => selectLayer(event.target.value));
  loadInfo();
});
