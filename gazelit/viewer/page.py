"""The routing viewer page: one self-contained HTML file (inline CSS, vanilla JS, the trace as inline JSON,
images as data URIs; nothing is fetched).

Hover a token to preview, click to pin it (arrow keys move). For the chosen layer (or all layers) and head
(each head in its own colour, one head, or the frequency over heads) the page outlines the regions that
were selected to produce that token on every image or frame, and beside it draws the dense attention the
same query would have paid to every visual token (per head, or averaged where the page stores averages).
Region outlines are SVG rects (class "sel", with data-unit / data-tile / data-head / data-freq), so the
page can be inspected and tested; `window.gazeViewer` exposes the state.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:16px;color:#1d1d1f;background:#fafafa}
h1{font-size:18px;margin:0 0 4px}
.meta{color:#555;margin-bottom:8px}
.prompt{white-space:pre-wrap;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 8px;margin:6px 0}
#controls{display:flex;gap:16px;align-items:center;margin:10px 0;flex-wrap:wrap}
#tokens{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;line-height:2.1}
.tok{white-space:pre;padding:2px 3px;margin:1px;border-radius:4px;cursor:pointer;border:1px solid #ccc;
     font-family:ui-monospace,Menlo,monospace}
.tok:hover{background:#e8f0fe}
.tok.pinned{background:#1a73e8;color:#fff;border-color:#1a73e8}
.tok.shown:not(.pinned){background:#d2e3fc}
#units{display:flex;flex-wrap:wrap;gap:18px;margin-top:12px}
.unit{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.unit h3{margin:0 0 6px;font-size:13px;color:#444}
.pair{display:flex;gap:8px}
figure{margin:0}
figcaption{font-size:12px;color:#666;text-align:center}
.stage{position:relative;width:var(--side);height:var(--side)}
.stage img,.stage svg,.stage canvas{position:absolute;left:0;top:0;width:100%;height:100%}
.stage canvas{image-rendering:pixelated}
#legend span{display:inline-block;margin-right:8px}
#legend i{display:inline-block;width:10px;height:10px;margin-right:3px;border-radius:2px}
#status{color:#555}
"""

_JS = r"""
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("trace-data").textContent);
  const [T, L, H, K] = D.selection.shape;
  const units = D.units;
  const dense = D.dense;
  const [DT, DL, DH, DV] = dense.shape;
  const bytes = Uint8Array.from(atob(dense.data), (c) => c.charCodeAt(0));
  const state = {pinned: T ? 0 : -1, shown: T ? 0 : -1, layer: "mean", head: "each"};
  const SVGNS = "http://www.w3.org/2000/svg";

  function headColor(h) { return "hsl(" + Math.round((h * 360) / Math.max(H, 1) + 10) % 360 + ",85%,45%)"; }
  function at(t, l, h, j) { return ((t * L + l) * H + h) * K + j; }

  function pairs() {
    const ls = state.layer === "mean" ? [...Array(L).keys()] : [Number(state.layer)];
    const hs = (state.head === "each" || state.head === "mean") ? [...Array(H).keys()] : [Number(state.head)];
    const out = [];
    for (const l of ls) for (const h of hs) out.push([l, h]);
    return out;
  }

  // selected (unit, tile) of token t for the chosen layers / heads: [{unit, tile, head, count}]
  function selections(t) {
    const ps = pairs();
    const byKey = new Map();
    const each = [];
    for (const [l, h] of ps) {
      for (let j = 0; j < K; j++) {
        const u = D.selection.unit[at(t, l, h, j)], tile = D.selection.tile[at(t, l, h, j)];
        if (u < 0) continue;
        each.push({unit: u, tile: tile, head: h, layer: l});
        const key = u + ":" + tile;
        byKey.set(key, (byKey.get(key) || 0) + 1);
      }
    }
    return {each: each, counts: byKey, n: ps.length};
  }

  function rect(svg, box, attrs) {
    const r = document.createElementNS(SVGNS, "rect");
    r.setAttribute("x", box[0]); r.setAttribute("y", box[1]);
    r.setAttribute("width", box[2] - box[0]); r.setAttribute("height", box[3] - box[1]);
    for (const [k, v] of Object.entries(attrs)) r.setAttribute(k, v);
    svg.appendChild(r);
    return r;
  }

  // look spans (model.look): the box a span names, drawn while token t is inside it (queries there are
  // biased towards it), dashed outside
  function drawLooks(t) {
    const svgs = document.querySelectorAll("svg.routing");
    for (const look of D.looks || []) {
      const inside = t >= look.start && t < look.end;
      rect(svgs[look.unit], look.box, {"class": "look" + (inside ? " active" : ""), "fill": "none",
        "stroke": "#d93025", "stroke-width": inside ? 0.02 : 0.008, "stroke-dasharray": inside ? "" : "0.03 0.02"});
    }
  }

  function drawRouting(t) {
    const svgs = document.querySelectorAll("svg.routing");
    svgs.forEach((svg) => { while (svg.firstChild) svg.removeChild(svg.firstChild); });
    if (t < 0) return;
    drawLooks(t);
    const s = selections(t);
    const perHead = state.head === "each" && state.layer !== "mean";
    if (perHead) {
      for (const e of s.each) {
        for (const u of units[e.unit].group) {
          const b = units[u].tiles[e.tile], pad = 0.006 * (e.head + 1);
          rect(svgs[u], [b[0] + pad, b[1] + pad, b[2] - pad, b[3] - pad], {
            "class": "sel", "data-unit": u, "data-tile": e.tile, "data-head": e.head, "fill": headColor(e.head),
            "fill-opacity": 0.12, "stroke": headColor(e.head), "stroke-width": 0.012});
        }
      }
    } else {
      for (const [key, count] of s.counts) {
        const [unit, tile] = key.split(":").map(Number);
        const f = count / s.n;
        for (const u of units[unit].group) {
          rect(svgs[u], units[u].tiles[tile], {
            "class": "sel", "data-unit": u, "data-tile": tile, "data-freq": f.toFixed(3), "fill": "#1a73e8",
            "fill-opacity": (0.1 + 0.6 * f).toFixed(3), "stroke": "#0b3d91", "stroke-width": 0.008});
        }
      }
    }
  }

  function denseMap(t) {
    const ps = pairs();
    const seen = new Set(), out = new Float32Array(DV);
    let n = 0;
    for (const [l, h] of ps) {
      const l2 = DL === 1 ? 0 : l, h2 = DH === 1 ? 0 : h, key = l2 * DH + h2;
      if (seen.has(key)) continue;
      seen.add(key); n++;
      const m = (t * DL + l2) * DH + h2, scale = dense.scale[m] / 255, base = m * DV;
      for (let v = 0; v < DV; v++) out[v] += bytes[base + v] * scale;
    }
    if (n) for (let v = 0; v < DV; v++) out[v] /= n;
    return out;
  }

  function heat(x) {  // 0..1 -> dark purple .. orange .. light yellow
    const stops = [[0, [0, 0, 4]], [0.35, [120, 28, 109]], [0.65, [237, 105, 37]], [1, [252, 255, 164]]];
    for (let i = 1; i < stops.length; i++) {
      if (x <= stops[i][0]) {
        const [a, ca] = stops[i - 1], [b, cb] = stops[i], w = (x - a) / (b - a);
        return ca.map((c, k) => Math.round(c + w * (cb[k] - c)));
      }
    }
    return stops[stops.length - 1][1];
  }

  function drawDense(t) {
    const canvases = document.querySelectorAll("canvas.dense");
    if (t < 0 || t >= DT || !DV) {
      canvases.forEach((c) => c.getContext("2d").clearRect(0, 0, c.width, c.height));
      return;
    }
    const m = denseMap(t);
    let max = 0;
    for (let v = 0; v < DV; v++) max = Math.max(max, m[v]);
    canvases.forEach((c, u) => {
      const [rows, cols] = units[u].grid, off = dense.offsets[u];
      const ctx = c.getContext("2d"), img = ctx.createImageData(cols, rows);
      for (let i = 0; i < rows * cols; i++) {
        const x = max > 0 ? m[off + i] / max : 0, [r, g, b] = heat(x);
        img.data.set([r, g, b, Math.round(255 * (0.15 + 0.7 * x))], 4 * i);
      }
      ctx.putImageData(img, 0, 0);
    });
  }

  function render(t) {
    state.shown = t;
    document.querySelectorAll(".tok").forEach((el) => {
      el.classList.toggle("shown", Number(el.dataset.t) === t);
      el.classList.toggle("pinned", Number(el.dataset.t) === state.pinned);
    });
    drawRouting(t);
    drawDense(t);
    const layer = state.layer === "mean" ? "all layers" : "layer " + state.layer;
    const head = state.head === "each" ? (state.layer === "mean" ? "frequency over heads" : "each head")
      : state.head === "mean" ? "frequency over heads" : "head " + state.head;
    const note = dense.detail === "head" ? "" : dense.detail === "layer"
      ? " (dense maps stored averaged over heads)" : " (dense maps stored averaged over layers and heads)";
    document.getElementById("status").textContent = t < 0 ? "no generated tokens"
      : "token " + t + " " + JSON.stringify(D.tokens[t]) + " | " + layer + ", " + head + note;
    document.getElementById("legend").style.display =
      state.head === "each" && state.layer !== "mean" ? "block" : "none";
  }

  function pin(t) { state.pinned = t; render(t); }

  function build() {
    const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
    for (let l = 0; l < L; l++) layerSel.add(new Option("layer " + l, String(l)));
    for (let h = 0; h < H; h++) headSel.add(new Option("head " + h, String(h)));
    layerSel.addEventListener("change", () => { state.layer = layerSel.value; render(state.shown); });
    headSel.addEventListener("change", () => { state.head = headSel.value; render(state.shown); });
    const legend = document.getElementById("legend");
    for (let h = 0; h < H; h++) {
      const s = document.createElement("span"), i = document.createElement("i");
      i.style.background = headColor(h); s.appendChild(i); s.appendChild(document.createTextNode("head " + h));
      legend.appendChild(s);
    }
    const strip = document.getElementById("tokens");
    D.tokens.forEach((tok, t) => {
      const el = document.createElement("span");
      el.className = "tok"; el.dataset.t = t;
      el.textContent = tok.replace(/\n/g, "\u23ce").replace(/[\x00-\x09\x0b-\x1f\x7f]/g,
        (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"));
      const look = (D.looks || []).find((l) => t >= l.start && t < l.end);
      el.title = "token " + t + (look ? " (inside a look at the red box)" : "");
      if (look) el.style.borderBottom = "2px solid #d93025";
      el.addEventListener("mouseenter", () => render(t));
      el.addEventListener("mouseleave", () => render(state.pinned));
      el.addEventListener("click", () => pin(t));
      strip.appendChild(el);
    });
    const side = units.length > 4 ? 180 : units.length > 1 ? 240 : 320;
    const box = document.getElementById("units");
    units.forEach((u, i) => {
      const div = document.createElement("div");
      div.className = "unit";
      div.style.setProperty("--side", side + "px");
      const title = document.createElement("h3");
      title.textContent = u.video >= 0 ? "frame " + u.time : (units.length > 1 ? "image " + i : "image");
      div.appendChild(title);
      const pair = document.createElement("div");
      pair.className = "pair";
      for (const kind of ["routing", "dense"]) {
        const fig = document.createElement("figure"), stage = document.createElement("div");
        stage.className = "stage";
        const img = document.createElement("img");
        img.src = D.images[i]; img.alt = title.textContent;
        stage.appendChild(img);
        if (kind === "routing") {
          const svg = document.createElementNS(SVGNS, "svg");
          svg.setAttribute("class", "routing"); svg.setAttribute("viewBox", "0 0 1 1");
          svg.setAttribute("preserveAspectRatio", "none"); svg.dataset.unit = i;
          stage.appendChild(svg);
        } else {
          const c = document.createElement("canvas");
          c.className = "dense"; c.width = u.grid[1]; c.height = u.grid[0];
          stage.appendChild(c);
        }
        fig.appendChild(stage);
        const cap = document.createElement("figcaption");
        cap.textContent = kind === "routing" ? "gaze: selected regions" : "dense attention (same query)";
        fig.appendChild(cap);
        pair.appendChild(fig);
      }
      div.appendChild(pair);
      box.appendChild(div);
    });
    document.addEventListener("keydown", (e) => {
      if (!T) return;
      if (e.key === "ArrowRight") pin(Math.min(T - 1, state.pinned + 1));
      if (e.key === "ArrowLeft") pin(Math.max(0, state.pinned - 1));
    });
    render(state.pinned);
  }

  build();
  window.gazeViewer = {state: state, render: render, pin: pin, selections: selections, data: D};
})();
"""


def render_page(data: dict[str, Any]) -> str:
    """The HTML page for `ViewerData.to_json()`."""
    model = data["model"]
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    meta = (f"k = {model['k']} regions per head, regions {'x'.join(map(str, model['region']))}, "
            f"M = {model['num_context']} context tokens per unit, attended visual KV per query: "
            f"{model['kv_size']}; {model['layers']} layers x {model['heads']} heads")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Gaze routing: {html.escape(data['prompt'][:80])}</title>
<style>{_CSS}</style></head>
<body>
<h1>Gaze Attention routing</h1>
<div class="meta">{html.escape(meta)}</div>
<div class="prompt"><b>Prompt:</b> {html.escape(data['prompt'])}</div>
<div class="prompt"><b>Answer:</b> {html.escape(data['answer'])}</div>
<div id="controls">
  <label>Layer <select id="layer"><option value="mean">all layers</option></select></label>
  <label>Heads <select id="head"><option value="each">each head</option>
    <option value="mean">frequency over heads</option></select></label>
  <span id="status"></span>
</div>
<div id="legend"></div>
<div id="tokens" title="hover to preview, click to pin, arrow keys to move"></div>
<div id="units"></div>
<script type="application/json" id="trace-data">{payload}</script>
<script>{_JS}</script>
</body></html>
"""


def write_page(data: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text(render_page(data), encoding="utf-8")
    return path
