// Kura's dashboard: draws the JSON API under /kura/api/v1/ into the page.
// No framework and no build step: plain DOM calls, SVG charts by hand.
"use strict";

const API = "/kura/api/v1/";
const REFRESH_MS = 5000;
const PAGE = 25;

async function api(path) {
  const response = await fetch(API + path, { credentials: "same-origin" });
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

// el("td", {class: "num"}, "text", child, ...): text is never parsed as HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
  return (unit === 0 ? value : value.toFixed(1)) + " " + units[unit];
}

// A size cell: readable text, the exact count in data-bytes.
function sizeCell(n) {
  return el("td", { class: "num size", "data-bytes": n, title: n === null || n === undefined ? null : n + " bytes" }, bytes(n));
}

function percent(rate) {
  return rate === null || rate === undefined ? "–" : (rate * 100).toFixed(1) + " %";
}

function ago(epochSeconds) {
  if (!epochSeconds) return "never";
  const seconds = Math.max(0, Math.round(Date.now() / 1000 - epochSeconds));
  if (seconds < 90) return seconds + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  if (seconds < 129600) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " d ago";
}

function shortDigest(digest) {
  return digest ? digest.replace("sha256:", "").slice(0, 12) : "–";
}

function replaceRows(tbody, rows, empty, columns) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: columns, class: "muted" }, empty))]));
}

// --- upstreams -------------------------------------------------------------

function allowance(limit) {
  if (!limit) return el("span", { class: "muted" }, "not reported");
  const hours = limit.window_seconds ? " per " + (limit.window_seconds / 3600) + " h" : "";
  return el("span", {}, limit.remaining + " / " + limit.limit + " left" + hours);
}

function health(upstream) {
  const state = upstream.reachable === null ? ["muted", "not asked yet"]
    : upstream.reachable ? ["good", "reachable"] : ["bad", "unreachable"];
  const failure = upstream.health.last_failure;
  return [el("span", { class: state[0] }, state[1]),
    failure ? el("div", { class: "muted" }, "last error " + ago(failure.at) + ": " + failure.what) : null,
    el("div", { class: "muted" }, upstream.health.requests + " requests, " + upstream.health.failures + " failed")];
}

function upstreamRow(u) {
  const served = u.served_bytes.cache;
  return el("tr", { "data-upstream": u.name },
    el("td", {}, el("b", {}, u.name)),
    el("td", {}, health(u)),
    sizeCell(u.fetched_bytes),
    el("td", { class: "num served", "data-bytes": served, "data-pulls": u.lookups.hit },
      bytes(served), el("div", { class: "muted" }, u.lookups.hit + " hits, " + u.lookups.miss + " misses")),
    el("td", { class: "num hit-rate" }, percent(u.hit_rate)),
    el("td", { class: "num manifest-requests" }, u.manifest_requests.GET + " / " + u.manifest_requests.HEAD),
    el("td", { class: "allowance" }, allowance(u.ratelimit)));
}

async function drawUpstreams() {
  const { upstreams } = await api("upstreams");
  replaceRows(document.querySelector("#upstreams tbody"), upstreams.map(upstreamRow), "no upstream configured", 7);
}

// --- cache -----------------------------------------------------------------

async function drawCache() {
  const c = await api("cache");
  const fill = c.max_bytes ? Math.min(100, 100 * c.bytes / c.max_bytes) : null;
  const gc = c.last_collection;
  const collection = gc
    ? (gc.error ? "failed " + ago(gc.at) + ": " + gc.error
      : ago(gc.at) + ": removed " + gc.removed_manifests + " manifests, " + gc.removed_blobs + " blobs (" + bytes(gc.freed_bytes) + ")")
    : "none yet";
  document.getElementById("cache").replaceChildren(el("div", { class: "facts" },
    el("div", { id: "cache-size", "data-bytes": c.bytes }, el("b", {}, bytes(c.bytes) + (c.max_bytes ? " of " + bytes(c.max_bytes) : "")),
      fill === null ? el("span", { class: "muted" }, "no cache.maxsize") : el("span", { class: "bar" }, el("span", { style: "width:" + fill.toFixed(1) + "%" })),
      el("div", { class: "muted" }, "measured every minute")),
    el("div", { id: "cache-objects" }, el("b", {}, c.objects), "objects"),
    el("div", { id: "cache-downloads" }, el("b", {}, c.downloads.running + " running, " + c.downloads.waiting + " waiting"), "downloads"),
    el("div", { id: "cache-gc" }, el("b", {}, collection), "last collection (evicted so far: " + c.evicted.blobs + " blobs, " + bytes(c.evicted.bytes) + ")")));
}

// --- downloads -------------------------------------------------------------

function downloadRow(d) {
  const share = d.total ? Math.min(100, 100 * d.received / d.total) : null;
  return el("tr", { "data-digest": d.digest },
    el("td", { class: "mono", title: d.digest }, shortDigest(d.digest)),
    el("td", {}, d.repository, el("span", { class: "muted" }, " (" + d.upstream + ")")),
    el("td", { class: "progress", "data-received": d.received, "data-total": d.total },
      share === null ? null : el("span", { class: "bar" }, el("span", { style: "width:" + share.toFixed(1) + "%" })),
      " " + bytes(d.received) + " of " + (d.total ? bytes(d.total) : "unknown")),
    el("td", { class: "num followers" }, d.followers),
    el("td", {}, d.state + ", " + d.seconds + " s"));
}

async function drawDownloads() {
  const { downloads, total } = await api("downloads");
  const rows = downloads.map(downloadRow);
  if (total > downloads.length) rows.push(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "… and " + (total - downloads.length) + " more")));
  replaceRows(document.querySelector("#downloads tbody"), rows, "none", 5);
}

// --- history ---------------------------------------------------------------

// Per-interval differences of running totals.
function deltas(samples, pick) {
  const points = [];
  for (let i = 1; i < samples.length; i++) {
    points.push({ at: samples[i].at, value: Math.max(0, pick(samples[i]) - pick(samples[i - 1])) });
  }
  return points;
}

function chart(title, series, format) {
  const width = 360, height = 120, pad = 4;
  const all = series.flatMap(s => s.points);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  if (all.length) {
    const t0 = Math.min(...all.map(p => p.at)), t1 = Math.max(...all.map(p => p.at));
    const top = Math.max(...all.map(p => p.value), 1e-9);
    for (const s of series) {
      const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      const xy = s.points.map(p => {
        const x = pad + (t1 > t0 ? (p.at - t0) / (t1 - t0) : 1) * (width - 2 * pad);
        const y = height - pad - (p.value / top) * (height - 2 * pad);
        return x.toFixed(1) + "," + y.toFixed(1);
      });
      if (xy.length === 1) xy.unshift(pad + "," + xy[0].split(",")[1]);
      line.setAttribute("points", xy.join(" "));
      line.setAttribute("stroke", s.color);
      svg.append(line);
    }
  }
  const latest = series.map(s => el("span", { style: "color:" + s.color }, s.name + ": " + (s.points.length ? format(s.points[s.points.length - 1].value) : "–")));
  return el("figure", {}, svg, el("figcaption", {}, el("b", {}, title), " ", el("span", { class: "legend" }, latest)));
}

async function drawHistory() {
  const { samples, interval_seconds } = await api("history");
  const hits = deltas(samples, s => s.hits), misses = deltas(samples, s => s.misses);
  const rate = hits.map((h, i) => ({ at: h.at, value: h.value + misses[i].value ? h.value / (h.value + misses[i].value) : 0 }));
  document.getElementById("charts").replaceChildren(el("div", { class: "charts" },
    chart("hit rate", [{ name: "hits", color: "#2e8b57", points: rate }], percent),
    chart("bytes", [
      { name: "served", color: "#2a6fb0", points: deltas(samples, s => s.served_bytes) },
      { name: "fetched", color: "#d9822b", points: deltas(samples, s => s.fetched_bytes) }], bytes),
    chart("upstream errors", [{ name: "errors", color: "#c0392b", points: deltas(samples, s => s.upstream_failures) }], String)),
    el("div", { class: "muted" }, "one point per " + interval_seconds / 60 + " min; the last one is now"));
}

// --- repositories: list, tags, manifest -------------------------------------

const browse = { query: "", pages: [null] };

function repoLink(name) {
  return el("a", { class: "repo", "data-repo": name, href: "#/repo/" + encodeURIComponent(name) }, name);
}

async function drawRepositories() {
  const last = browse.pages[browse.pages.length - 1];
  const query = "repositories?n=" + PAGE + "&q=" + encodeURIComponent(browse.query) + (last ? "&last=" + encodeURIComponent(last) : "");
  const { repositories, next } = await api(query);
  const search = el("input", { type: "search", id: "search", placeholder: "search repositories", value: browse.query });
  search.addEventListener("change", () => { browse.query = search.value; browse.pages = [null]; drawBrowse(); });
  const back = el("button", browse.pages.length > 1 ? {} : { disabled: "" }, "◀ previous");
  back.addEventListener("click", () => { browse.pages.pop(); drawBrowse(); });
  const more = el("button", next ? {} : { disabled: "" }, "next ▶");
  more.addEventListener("click", () => { browse.pages.push(next); drawBrowse(); });
  const rows = repositories.map(name => el("tr", {}, el("td", {}, repoLink(name))));
  const table = el("table", { id: "repositories" }, el("tbody"));
  replaceRows(table.tBodies[0], rows, browse.query ? "no repository matches" : "nothing cached yet", 1);
  return [search, table, el("div", { class: "pager" }, back, more)];
}

async function drawTags(name) {
  const { tags } = await api("repositories/" + name + "?n=100");
  const rows = tags.map(t => {
    const m = t.manifest || {};
    const kind = m.platforms ? m.platforms + " platforms" : (m.layers !== undefined ? m.layers + " layers" : "–");
    return el("tr", { "data-tag": t.tag },
      el("td", {}, el("b", {}, t.tag)),
      el("td", { class: "mono" }, t.digest ? el("a", { href: "#/manifest/" + encodeURIComponent(name) + "@" + t.digest, title: t.digest }, shortDigest(t.digest)) : "–"),
      sizeCell(m.size),
      el("td", {}, kind),
      el("td", { class: "last-pulled" }, ago(t.last_pulled)),
      el("td", {}, ago(t.confirmed_at)));
  });
  const table = el("table", { id: "tags" },
    el("thead", {}, el("tr", {}, ["tag", "digest", "size", "content", "last pulled", "confirmed upstream"].map(h => el("th", {}, h)))), el("tbody"));
  replaceRows(table.tBodies[0], rows, "no tags", 6);
  return [el("p", {}, el("a", { href: "#/" }, "all repositories"), " / ", el("b", { id: "repo-name" }, name)), table];
}

function descriptorRows(entries, name, linkManifests) {
  return entries.map(e => {
    const platform = e.platform ? [e.platform.os, e.platform.architecture, e.platform.variant].filter(Boolean).join("/") : (e.mediaType || "");
    const digest = linkManifests && e.cached
      ? el("a", { href: "#/manifest/" + encodeURIComponent(name) + "@" + e.digest, title: e.digest }, shortDigest(e.digest))
      : el("span", { title: e.digest }, shortDigest(e.digest));
    return el("tr", { "data-digest": e.digest }, el("td", {}, platform), el("td", { class: "mono" }, digest),
      sizeCell(e.image_size !== undefined ? e.image_size : e.size),
      el("td", { class: e.cached ? "good" : "muted" }, e.cached ? "cached" : "not cached"));
  });
}

async function drawManifest(name, digest) {
  const m = await api("repositories/" + name + "/manifests/" + digest);
  const head = el("tr", {}, ["platform / type", "digest", "size", ""].map(h => el("th", {}, h)));
  const parts = [el("p", {}, el("a", { href: "#/" }, "all repositories"), " / ", el("a", { href: "#/repo/" + encodeURIComponent(name) }, name), " / ", el("span", { class: "mono" }, digest)),
    el("p", {}, (m.mediaType || m.media_type || "unknown type") + ", " + bytes(m.bytes) + " manifest" + (m.size !== null ? ", image " + bytes(m.size) : ""))];
  if (m.platforms.length) parts.push(el("h3", {}, "Platforms"), el("table", { id: "platforms" }, el("thead", {}, head.cloneNode(true)), el("tbody", {}, descriptorRows(m.platforms, name, true))));
  if (m.config) parts.push(el("h3", {}, "Config"), el("table", {}, el("tbody", {}, descriptorRows([m.config], name, false))));
  if (m.layers.length) parts.push(el("h3", {}, "Layers"), el("table", { id: "layers" }, el("thead", {}, head.cloneNode(true)), el("tbody", {}, descriptorRows(m.layers, name, false))));
  if (m.truncated) parts.push(el("p", { class: "muted" }, "only the first entries are listed"));
  return parts;
}

async function drawBrowse() {
  const route = decodeURIComponent(location.hash.replace(/^#\/?/, ""));
  let parts;
  try {
    if (route.startsWith("repo/")) parts = await drawTags(route.slice(5));
    else if (route.startsWith("manifest/")) {
      const [name, digest] = route.slice(9).split("@");
      parts = await drawManifest(name, digest);
    } else parts = await drawRepositories();
  } catch (err) {
    parts = [el("p", { class: "bad" }, String(err.message))];
  }
  document.getElementById("browse").replaceChildren(...parts);
}

// --- refresh ---------------------------------------------------------------

async function refresh() {
  const results = await Promise.allSettled([drawUpstreams(), drawCache(), drawDownloads(), drawHistory()]);
  const failed = results.filter(r => r.status === "rejected");
  document.getElementById("updated").textContent = failed.length
    ? "update failed: " + failed[0].reason.message
    : "updated " + new Date().toLocaleTimeString();
}

window.addEventListener("hashchange", drawBrowse);
refresh();
drawBrowse();
setInterval(refresh, REFRESH_MS);
