// relaybus dashboard: live updates for the overview and the tail (no build step).
// Polls the JSON endpoints and redraws with DOM calls only (textContent, never
// innerHTML), so nothing read from the broker is ever parsed as markup.
(function () {
  "use strict";

  var SVG = "http://www.w3.org/2000/svg";
  var OVERVIEW_EVERY = 1500;   // ms between overview polls
  var TAIL_EVERY = 1000;       // ms between tail polls
  var WINDOW = 180000;         // ms of history the charts show at most
  var MIN_WINDOW = 30000;      // ... and at least (a page just opened)
  var TAIL_KEEP = 500;         // rows the tail keeps

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  function svgEl(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }

  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }

  function dash(value) { return value === null || value === undefined ? "–" : String(value); }

  function clock(date) { return date.toTimeString().slice(0, 8); }

  function getJSON(url) {
    return fetch(url, { headers: { Accept: "application/json" }, cache: "no-store",
                        credentials: "same-origin" })
      .then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (body) {
          if (!r.ok) { throw new Error(body.error || ("HTTP " + r.status)); }
          return body;
        });
      });
  }

  function status(ok, text) {
    var node = document.getElementById("updated");
    if (!node) { return; }
    node.textContent = text;
    node.classList.toggle("stale", !ok);
  }

  // A "nice" upper bound for an axis: 1, 2 or 5 times a power of ten.
  function niceMax(value) {
    if (!(value > 0)) { return 1; }
    var p = Math.pow(10, Math.floor(Math.log10(value)));
    var steps = [1, 2, 5, 10];
    for (var i = 0; i < steps.length; i++) { if (value <= steps[i] * p) { return steps[i] * p; } }
    return 10 * p;
  }

  function fmtRate(v) {
    if (v >= 1000) { return (v / 1000).toFixed(1) + "k"; }
    if (v >= 10 || v === 0) { return v.toFixed(0); }
    return v.toFixed(1);
  }

  function agoText(ms) {
    var secs = ms / 1000;
    if (secs < 120) { return Math.round(secs) + " s"; }
    var mins = secs / 60;
    return (Math.abs(mins - Math.round(mins)) < 0.05 ? Math.round(mins) : mins.toFixed(1)) + " min";
  }

  // series: [{cls, points: [[t, v], ...], area}]; draws into an svg of viewBox w x h.
  function drawLines(svg, series, now, opts) {
    var w = opts.width, h = opts.height, left = opts.left || 0, bottom = opts.bottom || 0;
    var top = opts.top || 0, right = opts.right || 0, span = opts.span || WINDOW;
    var max = 0;
    series.forEach(function (s) { s.points.forEach(function (p) { if (p[1] > max) { max = p[1]; } }); });
    max = niceMax(max);
    var x = function (t) { return left + (w - left - right) * (1 - (now - t) / span); };
    var y = function (v) { return top + (h - top - bottom) * (1 - v / max); };
    clear(svg);
    if (opts.axes) {
      [0, 0.5, 1].forEach(function (f) {
        var yy = y(max * f);
        svg.appendChild(svgEl("line", { x1: left, x2: w - right, y1: yy, y2: yy, "class": "gridline" }));
        var label = svgEl("text", { x: left - 6, y: yy + 4, "text-anchor": "end", "class": "axis" });
        label.textContent = fmtRate(max * f);
        svg.appendChild(label);
      });
      [3, 2, 1, 0].forEach(function (m) {
        var ago = span * m / 3;
        var label = svgEl("text", { x: x(now - ago), y: h - 3, "class": "axis",
                                    "text-anchor": m === 0 ? "end" : m === 3 ? "start" : "middle" });
        label.textContent = m === 0 ? "now" : "−" + agoText(ago);
        svg.appendChild(label);
      });
    }
    series.forEach(function (s) {
      var pts = s.points.filter(function (p) { return now - p[0] <= span; });
      if (!pts.length) { return; }
      var coords = pts.map(function (p) { return x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1); });
      if (s.area) {
        var first = x(pts[0][0]).toFixed(1), last = x(pts[pts.length - 1][0]).toFixed(1);
        var base = y(0).toFixed(1);
        svg.appendChild(svgEl("polygon", { points: first + "," + base + " " + coords.join(" ") +
                                           " " + last + "," + base, "class": "area " + s.cls }));
      }
      svg.appendChild(svgEl("polyline", { points: coords.join(" "), "class": "line " + s.cls }));
    });
  }

  // -- overview -------------------------------------------------------------------------

  function queueRow(q, history, now, span) {
    var tr = el("tr");
    tr.dataset.queue = q.name;
    var name = el("td", "name", q.name);
    if (q.is_log) { name.appendChild(document.createTextNode(" ")); name.appendChild(el("span", "tag", "event log")); }
    tr.appendChild(name);
    ["waiting", "pending", "delayed", "consumers"].forEach(function (f) {
      var td = el("td", "num", dash(q[f]));
      td.dataset.field = f;
      tr.appendChild(td);
    });
    [["oldest_waiting", q.oldest_waiting_text], ["rate_in", q.rate_in_text],
     ["rate_out", q.rate_out_text]].forEach(function (pair) {
      var td = el("td", "num", pair[1]);
      td.dataset.field = pair[0];
      tr.appendChild(td);
    });
    var sparkCell = el("td");
    var spark = svgEl("svg", { viewBox: "0 0 120 24", preserveAspectRatio: "none", "class": "spark" });
    sparkCell.appendChild(spark);
    tr.appendChild(sparkCell);
    var series = [{ cls: "published", points: [] }, { cls: "processed", points: [] }];
    history.forEach(function (p) {
      var r = p.queues[q.name];
      if (!r) { return; }
      if (r[0] !== null) { series[0].points.push([p.t, r[0]]); }
      if (r[1] !== null) { series[1].points.push([p.t, r[1]]); }
    });
    drawLines(spark, series, now, { width: 120, height: 24, top: 2, bottom: 2, span: span });
    var dlq = el("td", "num");
    dlq.dataset.field = "dlq";
    var link = el("a", q.dlq ? "count bad" : "count", q.dlq);
    link.href = q.dlq_url;
    dlq.appendChild(link);
    tr.appendChild(dlq);
    return tr;
  }

  function renderOverview(data) {
    var now = Date.now();
    var history = data.history || [];
    if (history.length) { now = Math.max(now, history[history.length - 1].t); }
    var span = history.length ? Math.min(WINDOW, Math.max(MIN_WINDOW, now - history[0].t)) : MIN_WINDOW;
    var windowText = document.getElementById("chart-window");
    if (windowText) { windowText.textContent = "last " + agoText(span); }
    var t = data.totals;
    var set = function (id, text) { var n = document.getElementById(id); if (n) { n.textContent = text; } };
    set("stat-published", t.published_text);
    set("stat-processed", t.processed_text);
    set("stat-waiting", t.waiting);
    set("stat-dlq", t.dlq);
    set("stat-consumers", t.consumers);
    set("kept", t.kept);
    var card = document.getElementById("stat-dlq-card");
    if (card) { card.classList.toggle("bad", t.dlq > 0); }

    var chart = document.getElementById("chart");
    if (chart) {
      drawLines(chart, [
        { cls: "published", area: true, points: history.map(function (p) { return [p.t, p.published]; }) },
        { cls: "processed", points: history.map(function (p) { return [p.t, p.processed]; }) }
      ], now, { width: 800, height: 180, left: 44, right: 8, top: 8, bottom: 20, axes: true,
                span: span });
    }

    var body = document.querySelector("#queues tbody");
    if (body) {
      clear(body);
      data.queues.forEach(function (q) { body.appendChild(queueRow(q, history, now, span)); });
      if (!data.queues.length) {
        var tr = el("tr", "empty"), td = el("td", null, "no queues");
        td.colSpan = 10; tr.appendChild(td); body.appendChild(tr);
      }
    }

    var subs = document.querySelector("#subscriptions tbody");
    if (subs) {
      clear(subs);
      data.subscriptions.forEach(function (s) {
        var tr = el("tr");
        tr.appendChild(el("td", null, s.service));
        var queue = el("td"), link = el("a", null, s.queue);
        link.href = s.dlq_url;
        link.title = "its dead-letter queue";
        queue.appendChild(link);
        tr.appendChild(queue);
        var types = el("td");
        s.event_types.forEach(function (t) {
          types.appendChild(el("span", "tag", t));
          types.appendChild(document.createTextNode(" "));
        });
        tr.appendChild(types);
        subs.appendChild(tr);
      });
      if (!data.subscriptions.length) {
        var none = el("tr", "empty"), c = el("td", null, "no subscriptions");
        c.colSpan = 3; none.appendChild(c); subs.appendChild(none);
      }
    }

    var consumers = document.querySelector("#consumers tbody");
    if (consumers) {
      clear(consumers);
      data.consumers.forEach(function (c) {
        var tr = el("tr");
        tr.appendChild(el("td", null, c.queue));
        tr.appendChild(el("td", "mono", c.name));
        tr.appendChild(el("td", "num", c.pending));
        tr.appendChild(el("td", "num", c.idle_text));
        consumers.appendChild(tr);
      });
      if (!data.consumers.length) {
        var row = el("tr", "empty"), cell = el("td", null, "no consumers connected");
        cell.colSpan = 4; row.appendChild(cell); consumers.appendChild(row);
      }
    }
  }

  function pollOverview() {
    if (document.hidden) { setTimeout(pollOverview, OVERVIEW_EVERY); return; }
    getJSON("/api/overview")
      .then(function (data) { renderOverview(data); status(true, "updated " + clock(new Date())); })
      .catch(function (err) { status(false, "not updating: " + err.message); })
      .then(function () { setTimeout(pollOverview, OVERVIEW_EVERY); });
  }

  // -- tail -----------------------------------------------------------------------------

  function startTail() {
    var table = document.getElementById("tail");
    var body = table.querySelector("tbody");
    var input = document.getElementById("type");
    var pause = document.getElementById("pause");
    var empty = document.getElementById("tail-empty");
    var count = document.getElementById("tail-count");
    var cursor = table.dataset.cursor;
    var paused = false;
    var types = (input.value || "").split(",").map(function (s) { return s.trim(); })
      .filter(function (s) { return s; });

    function shown() {
      count.textContent = body.rows.length;
      empty.hidden = body.rows.length > 0;
    }

    function add(events) {
      events.forEach(function (e) {
        var tr = el("tr");
        tr.appendChild(el("td", "mono", e.time_text));
        var type = el("td");
        type.appendChild(el("span", "tag", e.type || "?"));
        tr.appendChild(type);
        tr.appendChild(el("td", "mono", e.id));
        var payload = el("td", "payload mono", e.payload);
        payload.title = e.payload;
        tr.appendChild(payload);
        body.insertBefore(tr, body.firstChild);
      });
      while (body.rows.length > TAIL_KEEP) { body.deleteRow(body.rows.length - 1); }
      shown();
    }

    function poll() {
      if (paused || document.hidden) { setTimeout(poll, TAIL_EVERY); return; }
      var params = new URLSearchParams();
      params.set("cursor", cursor);
      types.forEach(function (t) { params.append("type", t); });
      getJSON("/api/tail?" + params.toString())
        .then(function (data) {
          cursor = data.cursor;
          table.dataset.cursor = cursor;
          add(data.events);
          status(true, "updated " + clock(new Date()));
        })
        .catch(function (err) { status(false, "not updating: " + err.message); })
        .then(function () { setTimeout(poll, TAIL_EVERY); });
    }

    pause.addEventListener("click", function () {
      paused = !paused;
      pause.textContent = paused ? "Resume" : "Pause";
      pause.setAttribute("aria-pressed", String(paused));
      status(true, paused ? "paused" : "live");
    });
    document.getElementById("clear").addEventListener("click", function () { clear(body); shown(); });
    shown();
    setTimeout(poll, TAIL_EVERY);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var page = document.body.dataset.page;
    if (page === "overview") { pollOverview(); }
    if (page === "tail") { startTail(); }
  });
})();
