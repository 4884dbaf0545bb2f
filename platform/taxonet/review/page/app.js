// taxonet review page: plain JavaScript over the review JSON API (no build step). See docs/review.md.
"use strict";

const state = {me: null, crops: [], focus: 0, selected: new Set(), history: [], results: [], active: 0};
const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  const init = {credentials: "same-origin", ...options};
  if (options.body !== undefined) {
    init.method = init.method || "POST";
    init.headers = {"Content-Type": "application/json"};
    init.body = JSON.stringify(options.body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) { showLogin(data.error ? data.error.message : ""); throw new Error("login"); }
  if (!response.ok) { throw new Error(data.error ? data.error.message : response.statusText); }
  return data;
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function requestId() {
  return Array.from(crypto.getRandomValues(new Uint8Array(12)), (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---------------------------------------------------------------- login
function showLogin(message) {
  for (const id of ["review", "stats"]) $(id).hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("login-error").textContent = message || "";
  $("login-name").value = localStorage.getItem("taxonet-reviewer") || "";
  $("login-name").focus();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = $("login-name").value.trim();
  try {
    await api("/api/login", {body: {name, token: $("login-token").value}});
    localStorage.setItem("taxonet-reviewer", name);
    $("login-token").value = "";
    await start();
  } catch (error) {
    if (error.message !== "login") $("login-error").textContent = error.message;
  }
});

$("logout").addEventListener("click", async () => {
  await api("/api/logout", {body: {}});
  showLogin("");
});

async function start() {
  const current = await api("/api/session");
  if (!current.reviewer) { showLogin(""); return; }
  state.me = await api("/api/me");
  $("login").hidden = true;
  $("logout").hidden = false;
  $("who").textContent = `reviewing as ${state.me.reviewer}`;
  fillSelect($("f-family"), state.me.families);
  fillSelect($("f-source"), state.me.sources);
  $("ns-rank").textContent = state.me.family_rank;
  showTab("review");
  await loadNext();
}

function fillSelect(select, values) {
  const keep = select.value;
  select.length = 1;
  for (const value of values) select.add(new Option(value, value));
  select.value = values.includes(keep) ? keep : "";
}

// ---------------------------------------------------------------- the queue
function filterQuery() {
  const query = new URLSearchParams({status: $("f-status").value, limit: "12"});
  for (const [key, id] of [["family", "f-family"], ["source", "f-source"], ["reason", "f-reason"]]) {
    if ($(id).value) query.set(key, $(id).value);
  }
  // the page's own address may narrow the queue: ?unsure_at=species (the unsure-rate alert's link)
  const unsureAt = new URLSearchParams(location.search).get("unsure_at");
  if (unsureAt) query.set("unsure_at", unsureAt);
  return query;
}

async function loadNext() {
  const data = await api(`/api/next?${filterQuery()}`);
  state.crops = data.crops;
  state.selected.clear();
  state.focus = 0;
  render();
}

for (const id of ["f-status", "f-family", "f-source", "f-reason"]) $(id).addEventListener("change", loadNext);

function focused() { return state.crops[state.focus]; }

function targets() {
  return state.selected.size ? [...state.selected] : (focused() ? [focused().crop_id] : []);
}

function labelText(decision) {
  if (!decision) return "";
  if (decision.kind === "taxon") return `${decision.taxon} (${decision.rank})`;
  if (decision.kind === "new_species") {
    return `new species in ${decision.parent}` + (decision.provisional ? ` “${decision.provisional}”` : "");
  }
  return decision.kind === "reject" ? "not an insect / unusable" : decision.kind;
}

function render() {
  const list = $("list");
  list.replaceChildren();
  state.crops.forEach((crop, index) => {
    const item = document.createElement("div");
    item.className = "thumb" + (index === state.focus ? " focus" : "") +
      (state.selected.has(crop.crop_id) ? " selected" : "") + (crop.mine ? " done" : "") +
      (crop.disputed ? " disputed" : "");
    item.dataset.crop = crop.crop_id;
    item.setAttribute("role", "option");
    const img = document.createElement("img");
    img.src = crop.image;
    img.alt = crop.crop_id;
    const caption = document.createElement("span");
    caption.textContent = `${crop.family || "?"} · ${crop.lowest_reliable_rank || "none"}` +
      (crop.similar && crop.similar.length ? ` · ${crop.similar.length} alike` : "") +
      (crop.disputed ? " · disputed" : "") + (crop.mine ? " ✓" : "");
    item.append(img, caption);
    item.addEventListener("click", (event) => {
      if (event.ctrlKey || event.metaKey || event.shiftKey) toggle(crop.crop_id);
      else { state.focus = index; render(); }
    });
    list.append(item);
  });
  renderDetail();
}

function renderDetail() {
  const crop = focused();
  $("empty").hidden = Boolean(crop);
  $("figure").hidden = !crop;
  $("answer").hidden = !crop;
  const body = $("answer").tBodies[0];
  body.replaceChildren();
  $("current-labels").replaceChildren();
  renderSelection();
  if (!crop) return;
  $("crop-image").src = crop.image;
  $("crop-meta").textContent = `${crop.crop_id} · ${crop.reason}` + (crop.source ? ` · ${crop.source}` : "") +
    ` · model ${crop.model} v${crop.model_version} · reliable down to ${crop.lowest_reliable_rank || "no rank"}`;
  for (const rank of crop.ranks) {
    const row = body.insertRow();
    row.className = rank.reliable ? "reliable" : "unsure";
    const alternatives = rank.top_k.slice(1).map((t) => `${t.label} ${(100 * t.probability).toFixed(0)}%`);
    for (const text of [rank.rank, rank.label ?? "—",
      rank.probability == null ? "—" : `${(100 * rank.probability).toFixed(1)}%`,
      rank.score == null ? "—" : rank.score.toFixed(2), rank.reliable ? "yes" : "no", alternatives.join(", ")]) {
      row.insertCell().textContent = text;
    }
  }
  const labels = Object.entries(crop.labels);
  if (labels.length) {
    const heading = document.createElement("p");
    heading.textContent = crop.disputed ? "Disputed — reviewers disagree:" : "Labels:";
    heading.className = crop.disputed ? "error" : "";
    const ul = document.createElement("ul");
    for (const [who, decision] of labels) {
      const li = document.createElement("li");
      li.textContent = `${who}: ${labelText(decision)}`;
      ul.append(li);
    }
    $("current-labels").append(heading, ul);
  }
}

function sharedRank(crops) {
  let shared = null;
  for (const rank of state.me.ranks) {
    const labels = new Set(crops.map((c) => (c.ranks.find((r) => r.rank === rank) || {}).label));
    if (labels.size !== 1 || [...labels][0] == null) break;
    shared = `${rank} ${[...labels][0]}`;
  }
  return shared;
}

function renderSelection() {
  const chosen = state.crops.filter((c) => state.selected.has(c.crop_id));
  $("selection-note").textContent = chosen.length ?
    `${chosen.length} selected — “accept” labels them as deep as their answers agree: ` +
      (sharedRank(chosen) || "none") :
    "";
}

function toggle(cropId) {
  if (state.selected.has(cropId)) state.selected.delete(cropId); else state.selected.add(cropId);
  render();
}

function advance() {
  const next = state.crops.findIndex((c, i) => i > state.focus && !c.mine);
  const first = state.crops.findIndex((c) => !c.mine);
  if (next >= 0) state.focus = next;
  else if (first >= 0) state.focus = first;
  else if ($("f-status").value === "unreviewed") { loadNext(); return; }
  render();
}

// ---------------------------------------------------------------- deciding
async function decide(fields, describe, crops = targets()) {
  if (!crops.length) return;
  try {
    const data = await api("/api/decisions", {body: {crop_ids: crops, request_id: requestId(), ...fields}});
    for (const view of data.crops.slice().reverse()) {
      const index = state.crops.findIndex((c) => c.crop_id === view.crop_id);
      if (index >= 0) state.crops[index] = {...state.crops[index], ...view};
      else state.crops.unshift(view);  // an undone crop the page had moved past comes back
    }
    if (fields.kind === "retract") state.focus = state.crops.findIndex((c) => c.crop_id === crops[0]);
    // back to the page, so the next crop's shortcuts work at once
    if (document.activeElement && document.activeElement.matches("input")) document.activeElement.blur();
    if (fields.kind !== "retract") state.history.push(crops);
    state.selected.clear();
    const first = data.decisions[0];
    say(`${describe || labelText(first)} — ${crops.length} crop${crops.length > 1 ? "s" : ""}`);
    clearSearch();
    $("ns-form").hidden = true;
    if (fields.kind === "retract") render(); else advance();
  } catch (error) {
    if (error.message !== "login") say(error.message, true);
  }
}

function accept() { decide({kind: "accept"}); }
function reject() { decide({kind: "reject"}); }

async function undo() {
  const crops = state.history.pop();
  if (!crops) { say("nothing to undo"); return; }
  await decide({kind: "retract"}, "undone", crops);
}

async function skip() {
  const crop = focused();
  if (!crop) return;
  await api("/api/skip", {body: {crop_ids: [crop.crop_id]}});
  state.crops.splice(state.focus, 1);
  state.selected.delete(crop.crop_id);
  if (state.focus >= state.crops.length) state.focus = 0;
  say(`skipped ${crop.crop_id}`);
  if (!state.crops.length && $("f-status").value === "unreviewed") await loadNext(); else render();
}

async function group() {
  const crop = focused();
  if (!crop) return;
  const data = await api(`/api/crops/${encodeURIComponent(crop.crop_id)}/similar`);
  state.crops = data.crops;
  state.focus = 0;
  state.selected = new Set(data.crops.length > 1 ? data.crops.map((c) => c.crop_id) : []);
  say(data.crops.length > 1 ? `${data.crops.length} look-alikes selected: name them once` : "no look-alikes");
  render();
}

function openNewSpecies() {
  $("ns-form").hidden = false;
  const crop = focused();
  $("ns-parent").value = crop && crop.family ? crop.family : "";
  $("ns-parent").focus();
  $("ns-parent").select();
}

$("ns-parent").addEventListener("input", async () => {
  const query = $("ns-parent").value.trim();
  if (!query) return;
  const data = await api(`/api/taxa?${new URLSearchParams({q: query, rank: state.me.family_rank})}`);
  $("ns-parents").replaceChildren(...data.taxa.map((t) => new Option(t.name)));
});

$("ns-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  let parent = $("ns-parent").value.trim();
  const data = await api(`/api/taxa?${new URLSearchParams({q: parent, rank: state.me.family_rank})}`);
  const exact = data.taxa.find((t) => t.name.toLowerCase() === parent.toLowerCase());
  if (exact) parent = exact.name;
  await decide({kind: "new_species", rank: state.me.family_rank, parent, provisional: $("ns-name").value.trim()});
  $("ns-name").value = "";
});

// ---------------------------------------------------------------- type-ahead
let searchTimer = null;
$("search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(runSearch, 120);
});

async function runSearch() {
  const query = $("search").value.trim();
  if (!query) { state.results = []; renderResults(); return; }
  const data = await api(`/api/taxa?${new URLSearchParams({q: query})}`);
  if ($("search").value.trim() !== query) return;
  state.results = data.taxa;
  state.active = 0;
  renderResults();
}

function renderResults() {
  const ul = $("results");
  ul.replaceChildren();
  state.results.forEach((taxon, index) => {
    const li = document.createElement("li");
    li.className = index === state.active ? "active" : "";
    li.dataset.rank = taxon.rank;
    li.dataset.name = taxon.name;
    li.textContent = `${taxon.name} `;
    const small = document.createElement("small");
    small.textContent = `${taxon.rank} · ${taxon.chain.slice(0, -1).join(" › ")}`;
    li.append(small);
    li.addEventListener("mousedown", (event) => { event.preventDefault(); pick(taxon); });
    ul.append(li);
  });
}

function pick(taxon) { decide({kind: "taxon", rank: taxon.rank, taxon: taxon.name}); }

function clearSearch() {
  $("search").value = "";
  state.results = [];
  renderResults();
}

$("search").addEventListener("keydown", (event) => {
  if (event.key === "ArrowDown" || event.key === "ArrowUp") {
    event.preventDefault();
    const step = event.key === "ArrowDown" ? 1 : -1;
    state.active = Math.max(0, Math.min(state.results.length - 1, state.active + step));
    renderResults();
  } else if (event.key === "Enter") {
    event.preventDefault();
    if (state.results[state.active]) pick(state.results[state.active]);
  } else if (event.key === "Escape") {
    clearSearch();
    $("search").blur();
  }
});

// ---------------------------------------------------------------- buttons and keys
$("accept").addEventListener("click", accept);
$("reject").addEventListener("click", reject);
$("skip").addEventListener("click", skip);
$("undo").addEventListener("click", undo);
$("group").addEventListener("click", group);
$("new-species").addEventListener("click", openNewSpecies);

document.addEventListener("keydown", (event) => {
  const target = event.target;
  if (target.matches("input, select, textarea")) {
    if (event.key === "Escape") { $("ns-form").hidden = true; target.blur(); }
    return;
  }
  if (event.altKey || !state.me || $("review").hidden) return;
  const key = event.key.toLowerCase();
  if ((event.ctrlKey || event.metaKey) && key !== "z") return;
  const actions = {
    a: accept, s: skip, u: undo, z: undo, n: openNewSpecies, x: reject, g: group,
    "/": () => $("search").focus(),
    " ": () => focused() && toggle(focused().crop_id),
    j: () => move(1), arrowdown: () => move(1), arrowright: () => move(1),
    k: () => move(-1), arrowup: () => move(-1), arrowleft: () => move(-1),
  };
  if (actions[key]) { event.preventDefault(); actions[key](); }
});

function move(step) {
  if (!state.crops.length) return;
  state.focus = (state.focus + step + state.crops.length) % state.crops.length;
  render();
}

// ---------------------------------------------------------------- statistics
function showTab(name) {
  $("review").hidden = name !== "review";
  $("stats").hidden = name !== "stats";
  $("tab-review").classList.toggle("active", name === "review");
  $("tab-stats").classList.toggle("active", name === "stats");
}

$("tab-review").addEventListener("click", () => showTab("review"));
$("tab-stats").addEventListener("click", async () => { showTab("stats"); await loadStats(); });

const percent = (x) => (x == null ? "—" : `${(100 * x).toFixed(1)}%`);
const share = (s) => (s.n ? `${s.agree}/${s.n} (${percent(s.rate)})` : "—");

async function loadStats() {
  const data = await api("/api/stats");
  const a = data.agreement;
  $("stats-summary").textContent = `${data.counts.reviewed} of ${data.counts.queued} queued crops reviewed; ` +
    `${a.crops_labelled} with one label, ${a.crops_disputed} disputed, ${a.crops_rejected} rejected. ` +
    `Model right at the expert's deepest rank: ${share(a.exact)}; one rank coarser: ${share(a.coarser)}.`;
  const ranks = $("stats-ranks").tBodies[0];
  ranks.replaceChildren();
  for (const r of a.ranks) {
    const row = ranks.insertRow();
    const interval = r.share.n ? `${percent(r.share.low)} – ${percent(r.share.high)}` : "—";
    for (const text of [r.rank, r.share.n, percent(r.share.rate), interval,
      r.kappa == null ? "—" : r.kappa.toFixed(3), share(r.when_reliable), share(r.when_unreliable)]) {
      row.insertCell().textContent = text;
    }
  }
  const reviewers = $("stats-reviewers").tBodies[0];
  reviewers.replaceChildren();
  for (const t of data.throughput) {
    const row = reviewers.insertRow();
    for (const text of [t.reviewer, t.decisions, t.retracts, t.crops, `${(t.active_s / 60).toFixed(1)} min`,
      t.per_hour == null ? "—" : t.per_hour.toFixed(0)]) {
      row.insertCell().textContent = text;
    }
  }
}

start().catch((error) => { if (error.message !== "login") say(error.message, true); });
