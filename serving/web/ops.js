// The operators' panel: reads /metrics (Prometheus text, admin scope) every few seconds, keeps the reads of
// the last 15 minutes in memory, and shows per endpoint the request rate, error shares and latency quantiles
// over the chosen window: the difference between the newest read and the oldest one inside the window, the
// way Prometheus' rate() and histogram_quantile() work on a scraped series. Nothing is stored on the server.
"use strict";

(() => {
  const KEEP_S = 15 * 60;
  const $ = (id) => document.getElementById(id);
  const reads = []; // [{t: seconds, samples: Map(key -> {name, labels, value})}], oldest first
  let timer = 0, paused = false;
  const keys = Serving.keyPanel(() => poll());

  // -- Prometheus text format ------------------------------------------------------------------------
  const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

  function number(text) {
    if (text === "+Inf") return Infinity;
    if (text === "-Inf") return -Infinity;
    return Number(text);
  }

  /** Every sample of an exposition, keyed by its name and sorted labels. */
  function parse(text) {
    const samples = new Map();
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const match = LINE.exec(line);
      if (!match) continue;
      const labels = {};
      for (const [, name, value] of (match[2] || "").matchAll(LABEL)) {
        labels[name] = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
      const key = match[1] + JSON.stringify(Object.entries(labels).sort());
      samples.set(key, { name: match[1], labels, value: number(match[3]) });
    }
    return samples;
  }

  /** How much a counter grew from `base` to `now`; a counter that went down was reset (a server restart). */
  function growth(now, base, key) {
    const value = now.samples.get(key).value;
    const before = base.samples.has(key) ? base.samples.get(key).value : 0;
    return value >= before ? value - before : value;
  }

  function series(read, name, filter = () => true) {
    return [...read.samples].filter(([, s]) => s.name === name && filter(s.labels));
  }

  /** The q-quantile from cumulative bucket counts [[le, count], ...], interpolated as histogram_quantile does. */
  function quantile(q, buckets) {
    const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
    if (!total) return null;
    const rank = q * total;
    let lower = 0, below = 0;
    for (const [le, count] of buckets) {
      if (count >= rank) {
        if (le === Infinity) return lower;
        return count === below ? le : lower + (le - lower) * (rank - below) / (count - below);
      }
      lower = le;
      below = count;
    }
    return lower;
  }

  function bucketsOf(now, base, name, label, value) {
    const buckets = series(now, name, (labels) => labels[label] === value)
      .map(([key, sample]) => [number(sample.labels.le), growth(now, base, key)]);
    return buckets.sort((a, b) => a[0] - b[0]);
  }

  // -- reading ---------------------------------------------------------------------------------------
  async function poll() {
    clearTimeout(timer);
    if (paused) return;
    try {
      const { text } = await Serving.call("/metrics");
      reads.push({ t: performance.now() / 1000, samples: parse(text) });
      while (reads.length > 2 && reads[1].t < reads[reads.length - 1].t - KEEP_S) reads.shift();
      render();
    } catch (error) {
      status(Serving.explain(error), "error");
      if (error.status === 401 || error.status === 403) keys.ask();
    }
    timer = setTimeout(poll, Number($("every").value) * 1000);
  }

  function status(text, kind = "") {
    $("status").textContent = text;
    $("status").className = `message ${kind}`;
  }

  // -- showing ---------------------------------------------------------------------------------------
  const rate = (n) => (n >= 10 ? n.toFixed(0) : n.toFixed(n >= 1 ? 1 : 2));
  const ms = (s) => (s === null ? "–" : (s * 1000 >= 10 ? (s * 1000).toFixed(0) : (s * 1000).toFixed(1)));
  const share = (part, all) => (all ? `${part.toLocaleString("en")} (${(100 * part / all).toFixed(1)}%)` : "0");

  function span(seconds) {
    return seconds >= 90 ? `${Math.round(seconds / 60)} minutes` : `${Math.round(seconds)} seconds`;
  }

  function render() {
    const now = reads[reads.length - 1];
    const windowS = Number($("window").value);
    const base = reads.find((read) => read.t >= now.t - windowS - 0.5) || reads[0];
    const elapsed = now.t - base.t;
    const clock = new Date().toLocaleTimeString("en-GB");
    if (base === now) {
      status(`Read at ${clock}; rates need a second read, in a moment.`);
      return;
    }
    const shorter = elapsed < windowS - 1 ? " (since this page opened)" : "";
    status(`Updated at ${clock}, over the last ${span(elapsed)}${shorter}.`);
    renderEndpoints(now, base, elapsed);
    renderModels(now, base, elapsed);
    renderChart(now.t - windowS);
  }

  function cell(row, text, numeric = false) {
    const td = document.createElement(row.children.length ? "td" : "th");
    if (!row.children.length) td.scope = "row";
    if (numeric) td.className = "num";
    td.textContent = text;
    row.append(td);
  }

  function renderEndpoints(now, base, elapsed) {
    const rows = new Map();
    for (const [key, sample] of series(now, "serving_requests_total")) {
      const { endpoint, status: code } = sample.labels;
      const row = rows.get(endpoint) || { endpoint, total: 0, server: 0, refused: 0 };
      const grown = growth(now, base, key);
      row.total += grown;
      if (code.startsWith("5")) row.server += grown;
      if (code.startsWith("4")) row.refused += grown;
      rows.set(endpoint, row);
    }
    const body = $("endpoints").tBodies[0];
    body.replaceChildren(...[...rows.values()]
      .sort((a, b) => b.total - a.total || a.endpoint.localeCompare(b.endpoint))
      .map((row) => {
        const tr = document.createElement("tr");
        const buckets = bucketsOf(now, base, "serving_request_latency_seconds_bucket", "endpoint", row.endpoint);
        cell(tr, row.endpoint);
        cell(tr, rate(row.total / elapsed), true);
        cell(tr, row.total.toLocaleString("en"), true);
        cell(tr, share(row.server, row.total), true);
        cell(tr, share(row.refused, row.total), true);
        for (const q of [0.5, 0.9, 0.99]) cell(tr, ms(quantile(q, buckets)), true);
        if (row.server) tr.className = "bad";
        return tr;
      }));
  }

  function renderModels(now, base, elapsed) {
    const models = new Map();
    for (const [, sample] of series(now, "serving_model_info", () => true)) {
      if (!sample.value) continue;
      const { model, version, backend, mode } = sample.labels;
      const label = `${model}:${version}`;
      const entry = models.get(label) || { label, backend, mode, workers: 0 };
      entry.workers += 1;
      models.set(label, entry);
    }
    const value = (name, label) => {
      const found = series(now, name, (labels) => labels.model === label);
      return found.length ? { key: found[0][0], now: found[0][1].value } : null;
    };
    $("models").tBodies[0].replaceChildren(...[...models.values()].map((entry) => {
      const tr = document.createElement("tr");
      const calls = value("serving_inference_latency_seconds_count", entry.label);
      const batches = value("serving_batch_size_sum", entry.label);
      const batchCount = value("serving_batch_size_count", entry.label);
      const queued = value("serving_queue_depth", entry.label);
      const callsGrown = calls ? growth(now, base, calls.key) : 0;
      const samples = batches ? growth(now, base, batches.key) : 0;
      const batchGrown = batchCount ? growth(now, base, batchCount.key) : 0;
      const buckets = bucketsOf(now, base, "serving_inference_latency_seconds_bucket", "model", entry.label);
      cell(tr, entry.label);
      cell(tr, entry.backend);
      cell(tr, entry.mode);
      cell(tr, String(entry.workers), true);
      cell(tr, rate(callsGrown / elapsed), true);
      cell(tr, batchGrown ? (samples / batchGrown).toFixed(1) : "–", true);
      cell(tr, ms(quantile(0.5, buckets)), true);
      cell(tr, ms(quantile(0.99, buckets)), true);
      cell(tr, queued ? String(queued.now) : "–", true);
      return tr;
    }));
    const refused = series(now, "serving_rejected_requests_total")
      .map(([key, sample]) => [sample.labels.reason, growth(now, base, key)])
      .filter(([, count]) => count > 0);
    $("refusals").textContent = refused.length
      ? "Refused in the window, by reason: " + refused.map(([reason, count]) => `${reason} ${count}`).join(", ") + "."
      : "No request was refused in the window.";
  }

  function totalRequests(read) {
    let total = 0;
    for (const [, sample] of series(read, "serving_requests_total")) total += sample.value;
    return total;
  }

  function renderChart(since) {
    const chart = $("chart"), g = chart.getContext("2d");
    const style = getComputedStyle(document.body);
    const points = [];
    for (let i = 1; i < reads.length; i++) {
      if (reads[i].t < since) continue;
      const grown = Math.max(0, totalRequests(reads[i]) - totalRequests(reads[i - 1]));
      points.push([reads[i].t, grown / (reads[i].t - reads[i - 1].t)]);
    }
    const { width, height } = chart;
    g.clearRect(0, 0, width, height);
    g.fillStyle = style.getPropertyValue("--muted");
    g.font = "12px system-ui, sans-serif";
    const top = Math.max(1, ...points.map((p) => p[1]));
    g.fillText(`${rate(top)} requests/s`, 4, 12);
    g.fillText("0", 4, height - 4);
    if (points.length < 2) return;
    const t0 = points[0][0], t1 = points[points.length - 1][0];
    g.strokeStyle = style.getPropertyValue("--accent");
    g.lineWidth = 2;
    g.beginPath();
    points.forEach(([t, r], i) => {
      const x = 30 + (width - 34) * (t - t0) / Math.max(1e-9, t1 - t0);
      const y = height - 4 - (height - 22) * r / top;
      if (i) g.lineTo(x, y); else g.moveTo(x, y);
    });
    g.stroke();
    chart.setAttribute("aria-label", `Requests per second over the window, from ${rate(points[0][1])} to`
      + ` ${rate(points[points.length - 1][1])}; highest ${rate(top)}`);
  }

  $("window").addEventListener("change", () => reads.length && render());
  $("every").addEventListener("change", poll);
  $("pause").addEventListener("click", (event) => {
    paused = !paused;
    event.target.textContent = paused ? "Resume" : "Pause";
    if (paused) status("Paused."); else poll();
  });
  poll();
})();
