// The operators' panel's charts, drawn with uPlot (vendored: uplot.js, uplot.css; scripts/vendor-uplot.sh).
// Each chart is a line per endpoint or per model version over the chosen window; every point is computed from
// the reads of /metrics the page keeps (ops-metrics.js), over the last SMOOTH_S seconds before it, so a point
// is a rate (or a quantile) over 10 s, not the noise between two reads. A chart whose metrics are absent from
// /metrics (traffic rules, drift scores) is not shown.
"use strict";

const OpsCharts = (() => {
  const M = OpsMetrics;
  const SMOOTH_S = 10;
  const TOP = 6; // groups (endpoints or versions) drawn per chart, the busiest first
  const HEIGHT = 190;
  const PALETTE = ["#1a73e8", "#d93025", "#188038", "#9334e6", "#e37400", "#007b83", "#b06000", "#c5221f"];
  const endpointOf = (labels) => labels.endpoint;
  const versionOf = (labels) => labels.model;
  const perSecond = (sums, seconds) => new Map([...sums].map(([key, value]) => [key, value / seconds]));
  const charts = new Map(); // id -> {plot, signature}

  /** What each chart draws: its values at one point, from the read `now` and the read `base` before it. */
  const DEFINITIONS = [
    {
      id: "throughput", unit: "/s", what: "Requests per second",
      values: (now, base, seconds, by) => perSecond(by === "endpoint"
        ? M.grown(now, base, "serving_requests_total", endpointOf)
        : M.grown(now, base, "serving_model_requests_total", versionOf), seconds),
    },
    {
      id: "latency", unit: "ms", what: "Latency, p50 (dashed) and p99",
      values: (now, base, seconds, by) => {
        const values = new Map();
        const histograms = by === "endpoint"
          ? M.bucketsBy(now, base, "serving_request_latency_seconds", endpointOf)
          : M.bucketsBy(now, base, "serving_inference_latency_seconds", versionOf);
        for (const [group, buckets] of histograms) {
          for (const q of [50, 99]) {
            const value = M.quantile(q / 100, buckets);
            values.set(`${group} p${q}`, value === null ? null : value * 1000);
          }
        }
        return values;
      },
      dashed: (label) => label.endsWith(" p50"),
    },
    {
      id: "errors", unit: "/s", what: "Errors (solid) and refusals (dashed) per second", nonzero: true,
      values: (now, base, seconds, by) => perSecond(by === "endpoint"
        ? M.grown(now, base, "serving_requests_total", (labels) => (labels.status[0] === "5" ? `${labels.endpoint} 5xx`
          : labels.status[0] === "4" ? `${labels.endpoint} 4xx` : null))
        : M.grown(now, base, "serving_model_requests_total", (labels) => (labels.outcome === "error"
          ? `${labels.model} errors` : labels.outcome === "refused" ? `${labels.model} refused` : null)), seconds),
      dashed: (label) => label.endsWith(" 4xx") || label.endsWith(" refused"),
    },
    {
      id: "queue", unit: "", what: "Requests waiting for each model version (batched mode)",
      values: (now) => M.gauges(now, "serving_queue_depth", versionOf),
    },
    {
      id: "batch", unit: "", what: "Mean samples per model call, per model version",
      values: (now, base) => {
        const samples = M.grown(now, base, "serving_batch_size_sum", versionOf);
        const calls = M.grown(now, base, "serving_batch_size_count", versionOf);
        return new Map([...samples].map(([key, value]) => [key, calls.get(key) ? value / calls.get(key) : null]));
      },
    },
    {
      id: "traffic", unit: "%", what: "Traffic rules: each version's share (a shadow: the share copied)", optional: true,
      values: (now) => M.gauges(now, "serving_traffic_weight",
        (labels) => `${labels.model}:${labels.version} ${labels.role}`),
    },
    {
      id: "drift", unit: "", what: "Drift score per input (thresholds dashed)", optional: true,
      values: (now) => new Map([
        ...M.gauges(now, "serving_drift_score", (labels) => `${labels.model}:${labels.version} ${labels.input}`),
        ...M.gauges(now, "serving_drift_threshold", (labels) => "threshold"
          + (labels.model ? ` ${labels.model}${labels.version ? ":" + labels.version : ""}` : "")
          + (labels.input ? ` ${labels.input}` : "")),
      ]),
      dashed: (label) => label.startsWith("threshold"),
    },
  ];

  /** The chart's points over the window: [walls, Map(label -> values)]. */
  function timeline(reads, since, by, definition) {
    const walls = [], columns = new Map();
    let b = 0;
    for (let i = 1; i < reads.length; i++) {
      const now = reads[i];
      while (b + 1 < i && reads[b + 1].t <= now.t - SMOOTH_S) b++;
      if (now.t < since) continue;
      const base = reads[b];
      const values = definition.values(now, base, Math.max(1e-9, now.t - base.t), by);
      for (const [label, value] of values) {
        if (!columns.has(label)) columns.set(label, new Array(walls.length).fill(null));
        columns.get(label).push(value);
      }
      walls.push(now.wall);
      for (const column of columns.values()) if (column.length < walls.length) column.push(null);
    }
    return [walls, columns];
  }

  /** The labels to draw: those of the TOP busiest groups (by the sum of their values over the window). */
  function chosen(columns, definition) {
    const groupOf = (label) => label.replace(/ (p50|p99|4xx|5xx|errors|refused|stable|candidate|shadow)$/, "");
    const weight = new Map();
    for (const [label, values] of columns) {
      const sum = values.reduce((total, value) => total + (value || 0), 0);
      if (definition.nonzero && !sum) continue;
      weight.set(groupOf(label), (weight.get(groupOf(label)) || 0) + sum + 1e-9);
    }
    const groups = [...weight].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0])).slice(0, TOP).map(([g]) => g);
    const labels = [...columns.keys()].filter((label) => groups.includes(groupOf(label))
      && (!definition.nonzero || columns.get(label).some((value) => value)));
    return { groups, labels: labels.sort((a, b) => a.localeCompare(b)), groupOf };
  }

  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  const format = (value) => (value === null || value === undefined ? "–"
    : Math.abs(value) >= 100 ? value.toFixed(0) : Math.abs(value) >= 10 ? value.toFixed(1) : value.toPrecision(2));

  function options(definition, labels, groups, groupOf, width) {
    const muted = css("--muted"), line = css("--line");
    const axis = { stroke: muted, grid: { stroke: line, width: 1 }, ticks: { stroke: line, width: 1 } };
    return {
      width, height: HEIGHT,
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [axis, { ...axis, size: 56, values: (u, splits) => splits.map((v) => format(v) + definition.unit) }],
      series: [{}, ...labels.map((label) => ({
        label,
        stroke: PALETTE[groups.indexOf(groupOf(label)) % PALETTE.length],
        width: 2,
        dash: definition.dashed && definition.dashed(label) ? [6, 4] : undefined,
        value: (u, v) => format(v) + definition.unit,
        points: { show: false },
      }))],
      cursor: { drag: { x: false, y: false } },
      legend: { live: true },
    };
  }

  /** Draw every chart over [now - windowS, now], grouped by `by` ("endpoint" or "version"). */
  function render(reads, windowS, by, span) {
    if (reads.length < 2) return;
    const last = reads[reads.length - 1];
    for (const definition of DEFINITIONS) {
      const figure = document.getElementById(`chart-${definition.id}`);
      const [walls, columns] = timeline(reads, last.t - windowS, by, definition);
      const { groups, labels, groupOf } = chosen(columns, definition);
      figure.hidden = definition.optional && !columns.size;
      const note = figure.querySelector(".note");
      note.textContent = labels.length ? "" : (definition.nonzero ? "None in the window." : "No data in the window.");
      const target = figure.querySelector(".plot");
      const data = [walls, ...labels.map((label) => columns.get(label))];
      const signature = `${labels.join("\n")}|${css("--muted")}|${by}`;
      let chart = charts.get(definition.id);
      if (!chart || chart.signature !== signature) {
        if (chart) chart.plot.destroy();
        const plot = new uPlot(options(definition, labels, groups, groupOf, target.clientWidth || 600), data, target);
        plot.ctx.canvas.setAttribute("role", "img");
        chart = { plot, signature };
        charts.set(definition.id, chart);
      } else {
        chart.plot.setData(data);
      }
      chart.plot.setScale("x", { min: last.wall - windowS, max: last.wall });
      const latest = labels.map((label) => `${label} ${format(columns.get(label).at(-1))}${definition.unit}`);
      chart.plot.ctx.canvas.setAttribute("aria-label", `${definition.what} over the last ${span}`
        + (latest.length ? `; now: ${latest.join(", ")}` : "; no data"));
    }
  }

  function resize() {
    for (const [id, chart] of charts) {
      const width = document.querySelector(`#chart-${id} .plot`).clientWidth;
      if (width) chart.plot.setSize({ width, height: HEIGHT });
    }
  }

  new ResizeObserver(resize).observe(document.getElementById("charts"));
  return { render, DEFINITIONS };
})();
