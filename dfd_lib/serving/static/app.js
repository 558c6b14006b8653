// The page of `dfd serve`: choose or drop images, POST each to /explain, show the score,
// the per-expert bars and the heatmap; the threshold only recolours verdicts.
// The heatmap is the localisation heads' map (where the mixture predicts an edit) when the served mixture has
// heads, else Grad-CAM (where the experts looked); with heads, "Heatmap" switches between the two.
// With "Score faces" on, each face found gets a box coloured by its score (green real, red fake).
"use strict";

const state = { backbones: [], tokenRequired: false, threshold: null, moved: false };
const HEATMAP_LABELS = {  // as dfd_lib.scoring.maps.HEATMAP_LABELS
  localisation: "where it was edited (localisation head)",
  "grad-cam": "where the experts looked (Grad-CAM)",
};
const $ = (selector, root = document) => root.querySelector(selector);

function threshold() {  // the server's exact value until the slider is moved (the slider rounds to its step)
  if (state.threshold && !state.moved) return state.threshold.value;
  return parseFloat($("#threshold").value);
}

function recolour(card) {
  const prob = parseFloat(card.dataset.prob);
  if (Number.isNaN(prob)) return;
  const fake = prob >= threshold();
  card.classList.toggle("fake", fake);
  card.classList.toggle("real", !fake);
  $(".verdict", card).textContent = fake ? "fake" : "real";
  $(".verdict", card).title = `fake if the probability is at least ${threshold().toFixed(4)}`;
  card.querySelectorAll(".bar > span").forEach((bar) => {
    bar.classList.toggle("fake", parseFloat(bar.dataset.prob) >= threshold());
  });
}

function scoreColour(prob) {  // as dfd_lib.scoring.faces.score_colour: green -> yellow -> red
  const p = Math.min(Math.max(prob, 0), 1);
  return `rgb(${Math.round(255 * Math.min(1, 2 * p))}, ${Math.round(255 * Math.min(1, 2 * (1 - p)))}, 0)`;
}

function drawFaces(card, body) {
  const frame = $(".frame", card);
  frame.querySelectorAll(".face-box").forEach((box) => box.remove());
  const note = $(".faces-note", card);
  if (body.faces === undefined) return;
  body.faces.forEach((face, i) => {
    const [left, top, right, bottom] = face.box;
    const box = document.createElement("div");
    box.className = "face-box";
    box.dataset.prob = String(face.result);
    Object.assign(box.style, {
      left: `${(100 * left) / body.width}%`, top: `${(100 * top) / body.height}%`,
      width: `${(100 * (right - left)) / body.width}%`, height: `${(100 * (bottom - top)) / body.height}%`,
      borderColor: scoreColour(face.result),
    });
    const label = document.createElement("span");
    label.textContent = face.result.toFixed(3);
    label.style.background = scoreColour(face.result);
    box.title = `face ${i}: ${left} ${top} ${right} ${bottom}, fake probability ${face.result.toFixed(4)}`;
    box.append(label);
    frame.append(box);
  });
  note.textContent = body.faces_found
    ? `${body.faces_found} face(s) found; the score is face ${body.face_chosen}'s (rule: ${body.face_rule}); heatmap of ${body.heatmap_of}`
    : "no face found: the whole image was scored";
  note.hidden = false;
}

function showResult(card, body) {
  card.dataset.prob = String(body.result);
  $(".score", card).textContent = body.result.toFixed(4);
  const list = $(".experts", card);
  list.replaceChildren();
  body.experts.forEach((p, i) => {
    const item = document.createElement("li");
    item.className = "expert";
    const name = document.createElement("span");
    name.textContent = `expert ${i}`;
    name.title = (body.backbones || state.backbones)[i] || "";
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.dataset.prob = String(p);
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "expert-prob";
    value.textContent = p.toFixed(3);
    item.append(name, bar, value);
    list.append(item);
  });
  if (body.heatmap) {
    const heat = $(".heatmap", card);
    heat.src = body.heatmap;
    heat.dataset.kind = body.heatmap_kind;
    heat.alt = HEATMAP_LABELS[body.heatmap_kind] || "heatmap";
    heat.hidden = false;
    $(".heatmap-label", card).textContent = HEATMAP_LABELS[body.heatmap_kind] || "heatmap";
  }
  drawFaces(card, body);
  recolour(card);
  card.classList.add("done");
}

function showError(card, message) {
  $(".verdict", card).textContent = "not scored";
  const error = $(".error", card);
  error.textContent = message;
  error.hidden = false;
  card.classList.add("done", "failed");
}

async function score(file) {
  const card = $("#result-template").content.firstElementChild.cloneNode(true);
  card.dataset.name = file.name;
  $(".name", card).textContent = file.name;
  $(".original", card).src = URL.createObjectURL(file);
  $("#results").prepend(card);
  const form = new FormData();
  form.append("image", file, file.name);
  const headers = {};
  const token = $("#token").value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  try {
    const url = `/explain?faces=${$("#faces").checked}&map=${$("#heatmap-kind").value}`;
    const response = await fetch(url, { method: "POST", body: form, headers });
    const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) showError(card, body.error || `HTTP ${response.status}`);
    else showResult(card, body);
  } catch (err) {
    showError(card, `request failed: ${err}`);
  }
}

async function scoreAll(files) {
  for (const file of files) await score(file);  // one at a time: the model serves one batch at a time anyway
}

// The server's threshold (calibrated by `dfd calibrate`, given with --threshold, or 0.5 "not calibrated")
// sets the slider; moving it recolours the verdicts here only.
function showThreshold(info) {
  if (!info) return;
  state.threshold = info;
  $("#threshold").value = String(info.value);
  $("#threshold-value").textContent = info.value.toFixed(4);
  $("#threshold-source").textContent = info.note;
  document.querySelectorAll(".result.done").forEach(recolour);
}

// Demo weights (trained on the kit's own synthetic fakes) say so in a banner above everything else.
function showNotice(notice) {
  const banner = $("#demo-notice");
  banner.textContent = notice || "";
  banner.hidden = !notice;
}

// With localisation heads the heatmap is theirs by default and Grad-CAM stays one choice away; without, Grad-CAM.
function showHeatmapChoice(kinds) {
  const select = $("#heatmap-kind");
  const heads = kinds.includes("localisation");
  select.value = heads ? "localisation" : "grad-cam";
  $("#heatmap-row").hidden = !heads;
}

async function loadHealth() {
  try {
    const health = await (await fetch("/health")).json();
    state.backbones = health.model.backbones;
    state.tokenRequired = health.token_required;
    $("#token-row").hidden = !health.token_required;
    $("#model-info").textContent =
      `${health.model.experts} experts (${[...new Set(health.model.backbones)].join(", ")}) · ` +
      `${health.model.image_size} px · ${health.model.device}`;
    showThreshold(health.threshold);
    showNotice(health.notice);
    if (health.faces) $("#faces").checked = health.faces.default;
    showHeatmapChoice(health.heatmaps || ["grad-cam"]);
  } catch (err) {
    $("#model-info").textContent = `server unreachable: ${err}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const input = $("#file-input");
  const zone = $("#drop-zone");
  input.addEventListener("change", () => {
    scoreAll([...input.files]);
    input.value = "";
  });
  ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (event) => {
    event.preventDefault();
    zone.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    scoreAll([...event.dataTransfer.files]);
  });
  $("#threshold").addEventListener("input", () => {
    state.moved = true;
    $("#threshold-value").textContent = threshold().toFixed(4);
    if (state.threshold) {
      $("#threshold-source").textContent = Math.abs(threshold() - state.threshold.value) > 1e-4
        ? `moved on this page; the server's is ${state.threshold.value.toFixed(4)} (${state.threshold.source})`
        : state.threshold.note;
    }
    document.querySelectorAll(".result.done").forEach(recolour);
  });
  loadHealth();
});
