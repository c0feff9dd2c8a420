// The operators' panel's arithmetic: Prometheus text parsed into reads, and what the tables and charts show,
// computed between two reads the way Prometheus' rate() and histogram_quantile() work on a scraped series.
// No drawing here (ops-charts.js draws, ops.js reads and fills the tables).
"use strict";

const OpsMetrics = (() => {
  const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
  const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

  function number(text) {
    if (text === "+Inf") return Infinity;
    if (text === "-Inf") return -Infinity;
    return Number(text);
  }

  /** One read of /metrics: every sample keyed by its name and sorted labels, and the samples by name. */
  function parse(text, t = performance.now() / 1000, wall = Date.now() / 1000) {
    const samples = new Map();
    const byName = new Map();
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const match = LINE.exec(line);
      if (!match) continue;
      const labels = {};
      for (const [, name, value] of (match[2] || "").matchAll(LABEL)) {
        labels[name] = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
      const key = match[1] + JSON.stringify(Object.entries(labels).sort());
      const sample = { name: match[1], labels, value: number(match[3]), key };
      samples.set(key, sample);
      if (!byName.has(match[1])) byName.set(match[1], []);
      byName.get(match[1]).push(sample);
    }
    return { t, wall, samples, byName };
  }

  /** The samples of `name` in a read whose labels pass `filter`. */
  function series(read, name, filter = () => true) {
    return (read.byName.get(name) || []).filter((s) => filter(s.labels));
  }

  /** How much a counter grew from `base` to `now`; a counter that went down was reset (a server restart). */
  function growth(now, base, key) {
    const value = now.samples.get(key).value;
    const before = base.samples.has(key) ? base.samples.get(key).value : 0;
    return value >= before ? value - before : value;
  }

  /** Counter growth from `base` to `now`, summed by `group(labels)` (a null group is left out). */
  function grown(now, base, name, group) {
    const sums = new Map();
    for (const sample of series(now, name)) {
      const key = group(sample.labels);
      if (key === null || key === undefined) continue;
      sums.set(key, (sums.get(key) || 0) + growth(now, base, sample.key));
    }
    return sums;
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

  /** A histogram's bucket growth from `base` to `now` by `group(labels)`: Map(group -> [[le, count], ...]). */
  function bucketsBy(now, base, name, group) {
    const found = new Map();
    for (const sample of series(now, name + "_bucket")) {
      const key = group(sample.labels);
      if (key === null || key === undefined) continue;
      if (!found.has(key)) found.set(key, new Map());
      const le = number(sample.labels.le);
      const buckets = found.get(key);
      buckets.set(le, (buckets.get(le) || 0) + growth(now, base, sample.key));
    }
    return new Map([...found].map(([key, buckets]) => [key, [...buckets].sort((a, b) => a[0] - b[0])]));
  }

  /** One group's buckets (the tables' use). */
  function bucketsOf(now, base, name, label, value) {
    return bucketsBy(now, base, name.replace(/_bucket$/, ""), (labels) => (labels[label] === value ? value : null))
      .get(value) || [];
  }

  /** A gauge's value at `now` by `group(labels)`, summed. */
  function gauges(now, name, group) {
    const values = new Map();
    for (const sample of series(now, name)) {
      const key = group(sample.labels);
      if (key === null || key === undefined) continue;
      values.set(key, (values.get(key) || 0) + sample.value);
    }
    return values;
  }

  return { parse, series, growth, grown, quantile, bucketsBy, bucketsOf, gauges };
})();
