// The operators' panel: reads /metrics (Prometheus text, admin scope) every few seconds, keeps the reads of
// the last 15 minutes in memory, and shows per endpoint the request rate, error shares and latency quantiles
// over the chosen window: the difference between the newest read and the oldest one inside the window, the
// way Prometheus' rate() and histogram_quantile() work on a scraped series (ops-metrics.js). The charts
// (ops-charts.js) draw the same numbers over time. Nothing is stored on the server.
"use strict";

(() => {
  const KEEP_S = 15 * 60;
  const $ = (id) => document.getElementById(id);
  const reads = []; // [{t: seconds, samples: Map(key -> {name, labels, value})}], oldest first
  let timer = 0, paused = false;
  const keys = Serving.keyPanel(() => poll());

  const { parse, series, growth, quantile, bucketsOf } = OpsMetrics;

  // -- reading ---------------------------------------------------------------------------------------
  async function poll() {
    clearTimeout(timer);
    if (paused) return;
    try {
      const { text } = await Serving.call("/metrics");
      reads.push(parse(text));
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
    OpsCharts.render(reads, windowS, $("by").value, span(windowS));
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
    for (const sample of series(now, "serving_requests_total")) {
      const { endpoint, status: code } = sample.labels;
      const row = rows.get(endpoint) || { endpoint, total: 0, server: 0, refused: 0 };
      const grown = growth(now, base, sample.key);
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
    for (const sample of series(now, "serving_model_info")) {
      if (!sample.value) continue;
      const { model, version, backend, mode } = sample.labels;
      const label = `${model}:${version}`;
      const entry = models.get(label) || { label, backend, mode, workers: 0 };
      entry.workers += 1;
      models.set(label, entry);
    }
    const value = (name, label) => {
      const found = series(now, name, (labels) => labels.model === label);
      return found.length ? { key: found[0].key, now: found[0].value } : null;
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
      .map((sample) => [sample.labels.reason, growth(now, base, sample.key)])
      .filter(([, count]) => count > 0);
    $("refusals").textContent = refused.length
      ? "Refused in the window, by reason: " + refused.map(([reason, count]) => `${reason} ${count}`).join(", ") + "."
      : "No request was refused in the window.";
  }

  $("window").addEventListener("change", () => reads.length && render());
  $("by").addEventListener("change", () => reads.length && render());
  $("every").addEventListener("change", poll);
  $("pause").addEventListener("click", (event) => {
    paused = !paused;
    event.target.textContent = paused ? "Resume" : "Pause";
    if (paused) status("Paused."); else poll();
  });
  poll();
})();
