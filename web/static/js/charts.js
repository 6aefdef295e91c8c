// Plotly trace and layout builders (pure: data in, plain objects out) and a render helper.

import { METHOD_ORDER, METHOD_STYLE, OPTIMIZER_COLORS, SPARE_COLORS } from './palette.js';
import { ema } from './stats.js';

// One colour per optimizer on every chart and in the PNGs of `dykaf-lab run`: the colours live in
// server/palette.py (generated into palette.js); a shadow method has its optimizer's colour.
export { METHOD_ORDER, METHOD_STYLE };
const FALLBACK_COLOR = SPARE_COLORS[0];

/** Plotly renders a small HTML subset in names and titles; make any text literal. */
export function plotlyText(text) {
  return String(text).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/**
 * Colour of each label, given `[label, optimizer]` pairs in the job's order: server/palette.py's
 * `label_colors`, the same rule (a browser test compares them). The first label of an optimizer gets
 * the optimizer's colour; another label of the same optimizer (a sweep point) or an unknown
 * optimizer gets the next spare colour, then those of optimizers the job does not use.
 */
export function colorMap(pairs) {
  const seen = new Set();
  const unique = pairs.filter(([label, optimizer]) => {
    const key = `${label}\u0000${optimizer}`;
    if (seen.has(key)) return false;
    seen.add(key);
    return true;
  });
  const map = new Map();
  const used = new Set();
  for (const [label, optimizer] of unique) {
    const color = Object.hasOwn(OPTIMIZER_COLORS, optimizer) ? OPTIMIZER_COLORS[optimizer] : null;
    if (!map.has(label) && color !== null && !used.has(color)) {
      map.set(label, color);
      used.add(color);
    }
  }
  const present = new Set(unique.filter(([, o]) => Object.hasOwn(OPTIMIZER_COLORS, o)).map(([, o]) => OPTIMIZER_COLORS[o]));
  const extra = [...SPARE_COLORS, ...Object.values(OPTIMIZER_COLORS).filter((c) => !present.has(c))];
  const free = extra.filter((c) => !used.has(c));
  let index = 0;
  for (const [label] of unique) {
    if (!map.has(label)) {
      map.set(label, free.length ? free[index % free.length] : extra[index % extra.length]);
      index += 1;
    }
  }
  return map;
}

export function rgba(hex, alpha) {
  const v = parseInt(hex.slice(1), 16);
  return `rgba(${(v >> 16) & 255}, ${(v >> 8) & 255}, ${v & 255}, ${alpha})`;
}

const finite = (v) => typeof v === 'number' && Number.isFinite(v);

/** A closed polygon between `lower` and `upper` (one trace per band); points missing a bound are dropped. */
export function bandTrace(xs, lower, upper, { color, label }) {
  const fx = [];
  const lo = [];
  const hi = [];
  for (let i = 0; i < xs.length; i += 1) {
    if (finite(xs[i]) && finite(lower[i]) && finite(upper[i])) {
      fx.push(xs[i]);
      lo.push(lower[i]);
      hi.push(upper[i]);
    }
  }
  return {
    type: 'scatter',
    mode: 'lines',
    x: fx.concat(fx.slice().reverse()),
    y: hi.concat(lo.slice().reverse()),
    fill: 'toself',
    fillcolor: rgba(color, 0.16),
    line: { width: 0, color },
    hoverinfo: 'skip',
    showlegend: false,
    legendgroup: plotlyText(label),
    name: `${plotlyText(label)} band`,
    meta: { role: 'band', label },
  };
}

/**
 * Mean line (plus a band across seeds when any bucket has more than one seed) per label for one
 * metric of the API's `aggregates`. `xOf(label, steps)` maps steps to the chosen x-axis.
 */
export function aggregateTraces(aggregates, { name, colors, xOf, smoothing = 0, band = 'minmax' }) {
  const traces = [];
  const items = aggregates.filter((a) => a.name === name);
  const order = [...colors.keys()];
  items.sort((a, b) => order.indexOf(a.label) - order.indexOf(b.label));
  for (const a of items) {
    const color = colors.get(a.label) || FALLBACK_COLOR;
    const xs = xOf(a.label, a.step);
    const mean = ema(a.mean, smoothing);
    const multi = a.n.some((n) => n > 1);
    if (band !== 'none' && multi) {
      let lower;
      let upper;
      if (band === 'std') {
        lower = a.mean.map((m, i) => (finite(m) && finite(a.std[i]) ? m - a.std[i] : finite(m) ? m : null));
        upper = a.mean.map((m, i) => (finite(m) && finite(a.std[i]) ? m + a.std[i] : finite(m) ? m : null));
      } else {
        lower = a.min;
        upper = a.max;
      }
      traces.push(bandTrace(xs, ema(lower, smoothing), ema(upper, smoothing), { color, label: a.label }));
    }
    const sparse = a.step.length <= 60;
    traces.push({
      type: 'scatter',
      mode: sparse ? 'lines+markers' : 'lines',
      x: xs,
      y: mean,
      name: plotlyText(a.label),
      legendgroup: plotlyText(a.label),
      line: { color, width: 2 },
      marker: { size: 4 },
      connectgaps: true,
      customdata: a.n,
      hovertemplate: `%{y:.4f}<extra>${plotlyText(a.label)} (n=%{customdata})</extra>`,
      meta: { role: 'mean', label: a.label },
    });
  }
  return traces;
}

/** Thin dotted lines, one per run, for the API's per-run `series`. */
export function seedTraces(series, { name, colors, xOf, smoothing = 0 }) {
  const order = [...colors.keys()];
  return series
    .filter((s) => s.name === name)
    .sort((a, b) => order.indexOf(a.label) - order.indexOf(b.label) || a.seed - b.seed)
    .map((s) => ({
      type: 'scatter',
      mode: 'lines',
      x: xOf(s.label, s.step, s.run_id),
      y: ema(s.value, smoothing),
      name: `${plotlyText(s.label)} · seed ${s.seed}`,
      legendgroup: plotlyText(s.label),
      showlegend: false,
      opacity: 0.55,
      line: { color: colors.get(s.label) || FALLBACK_COLOR, width: 1, dash: 'dot' },
      connectgaps: true,
      hovertemplate: `%{y:.4f}<extra>${plotlyText(s.label)} seed ${s.seed}</extra>`,
      meta: { role: 'seed', label: s.label, seed: s.seed },
    }));
}

/**
 * Mean across seeds of Fisher series, keyed `layer|metric|method|label`, each `{layer, metric,
 * method, label, step, value}` with steps sorted.
 */
export function fisherMeans(series) {
  const acc = new Map();
  for (const s of series) {
    const key = [s.layer, s.metric, s.method, s.label].join('\u0000');
    if (!acc.has(key)) acc.set(key, { layer: s.layer, metric: s.metric, method: s.method, label: s.label, sums: new Map() });
    const { sums } = acc.get(key);
    s.step.forEach((step, i) => {
      const v = s.value[i];
      if (!finite(v)) return;
      const cell = sums.get(step) || [0, 0];
      cell[0] += v;
      cell[1] += 1;
      sums.set(step, cell);
    });
  }
  const out = new Map();
  for (const [key, { sums, ...rest }] of acc) {
    const steps = [...sums.keys()].sort((a, b) => a - b);
    out.set(key, { ...rest, step: steps, value: steps.map((st) => sums.get(st)[0] / sums.get(st)[1]) });
  }
  return out;
}

export function fisherLayers(means) {
  const layers = new Set();
  for (const m of means.values()) layers.add(m.layer);
  return [...layers].sort();
}

/** One trace per method (mean over the selected label's seeds) for a layer and metric. */
export function fisherMethodTraces(means, { layer, metric, label }) {
  const found = [...means.values()].filter((m) => m.layer === layer && m.metric === metric && m.label === label);
  found.sort((a, b) => rank(a.method) - rank(b.method));
  return found.map((m) => {
    const style = METHOD_STYLE[m.method] || { name: m.method, color: '#777777', dash: 'solid' };
    const name = plotlyText(style.name);
    return {
      type: 'scatter',
      mode: m.step.length <= 40 ? 'lines+markers' : 'lines',
      x: m.step,
      y: m.value,
      name,
      line: { color: style.color, width: m.method === 'optimal' ? 2 : 1.8, dash: style.dash },
      marker: { size: 4 },
      hovertemplate: `%{y:.4f}<extra>${name}</extra>`,
      meta: { method: m.method },
    };
  });
}

/** One trace per label: a method's metric (by default every optimizer's own preconditioner). */
export function fisherLabelTraces(means, { layer, metric, method = 'own', colors }) {
  const order = [...colors.keys()];
  const found = [...means.values()].filter((m) => m.layer === layer && m.metric === metric && m.method === method);
  found.sort((a, b) => order.indexOf(a.label) - order.indexOf(b.label));
  return found.map((m) => ({
    type: 'scatter',
    mode: m.step.length <= 40 ? 'lines+markers' : 'lines',
    x: m.step,
    y: m.value,
    name: plotlyText(m.label),
    line: { color: colors.get(m.label) || FALLBACK_COLOR, width: 1.8 },
    marker: { size: 4 },
    hovertemplate: `%{y:.4f}<extra>${plotlyText(m.label)}</extra>`,
    meta: { label: m.label },
  }));
}

/** Display name of a Fisher method (as in the chart legends). */
export function methodName(method) {
  return (METHOD_STYLE[method] || { name: method }).name;
}

/**
 * The same Fisher traces as a dot plot when they all hold a single report (a short run reports
 * once, at its last step): a step axis would show one dot per method on a one-step range, so the
 * methods go on a categorical y axis and the value on x, one trace each (colours, hover and
 * legend entries unchanged). ``null`` when the traces span more than one step.
 * ``floor``: the value of the trace whose ``meta.method`` is ``optimal``, if any, to draw as a line.
 */
export function fisherSnapshot(traces) {
  if (!traces.length || traces.some((t) => t.x.length !== 1)) return null;
  const steps = new Set(traces.map((t) => t.x[0]));
  if (steps.size !== 1) return null;
  const floor = traces.find((t) => t.meta && t.meta.method === 'optimal');
  return {
    step: traces[0].x[0],
    floor: floor ? floor.y[0] : null,
    traces: traces.map((t) => ({
      ...t,
      mode: 'markers',
      x: t.y,
      y: [t.name],
      marker: { size: 11, color: t.line.color, symbol: t.meta && t.meta.method === 'optimal' ? 'diamond' : 'circle' },
      hovertemplate: `%{x:.4f}<extra>${t.name}</extra>`,
    })).reverse(), // Plotly draws the first category at the bottom; keep the legend's top-down order
  };
}

function rank(method) {
  const i = METHOD_ORDER.indexOf(method);
  return i < 0 ? METHOD_ORDER.length : i;
}

/** Horizontal dashed line at `target` across the plot (a shape, so it is not a trace). */
export function targetShapes(target, logY) {
  if (!finite(target)) return { shapes: [], annotations: [] };
  const y = logY ? Math.log10(target) : target;
  return {
    shapes: [{ type: 'line', xref: 'paper', x0: 0, x1: 1, yref: 'y', y0: target, y1: target, line: { color: '#b3261e', width: 1.5, dash: 'dash' } }],
    annotations: [{ xref: 'paper', x: 1, yref: 'y', y, text: `target ${target}`, showarrow: false, xanchor: 'right', yanchor: 'bottom', font: { size: 10, color: '#b3261e' } }],
  };
}

export function baseLayout({ title, xTitle, yTitle, logY = false, uirevision = 'keep', empty = null, height, compact = false }) {
  const layout = {
    title: { text: plotlyText(title), font: { size: compact ? 13 : 14 }, x: 0.01, xanchor: 'left' },
    margin: { l: 58, r: 14, t: 34, b: compact ? 30 : 44 },
    xaxis: { title: { text: plotlyText(xTitle), font: { size: 11 } }, zeroline: false, automargin: true },
    yaxis: { title: { text: plotlyText(yTitle), font: { size: 11 } }, type: logY ? 'log' : 'linear', zeroline: false, automargin: true },
    legend: compact
      ? { orientation: 'h', x: 0, y: -0.2, yanchor: 'top', font: { size: 10 } }
      : { orientation: 'h', y: -0.22, font: { size: 11 } },
    hovermode: 'closest',
    showlegend: !empty,
    uirevision,
    paper_bgcolor: '#ffffff',
    plot_bgcolor: '#ffffff',
    font: { family: 'system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif', size: 12, color: '#1c2330' },
  };
  if (height) layout.height = height;
  if (empty) {
    layout.annotations = [{ text: plotlyText(empty), xref: 'paper', yref: 'paper', x: 0.5, y: 0.5, showarrow: false, font: { size: 13, color: '#5d6675' } }];
    layout.xaxis.visible = false;
    layout.yaxis.visible = false;
  }
  return layout;
}

export const PLOT_CONFIG = {
  responsive: true,
  displaylogo: false,
  modeBarButtonsToRemove: ['select2d', 'lasso2d', 'autoScale2d'],
  toImageButtonOptions: { format: 'svg' },
};

let plotlyPromise = null;

/** Resolves once Plotly.js (loaded with `async` by the page, in parallel with the data) has run. */
export function plotlyReady() {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  if (!plotlyPromise) {
    plotlyPromise = new Promise((resolve, reject) => {
      const script = document.getElementById('plotly-js');
      if (!script) {
        reject(new Error('the chart library (plotly.min.js) is not on this page'));
        return;
      }
      script.addEventListener('load', () => resolve(window.Plotly));
      script.addEventListener('error', () => reject(new Error('the chart library (plotly.min.js) did not load')));
    });
  }
  return plotlyPromise;
}

/** Draw or update a chart; resolves when Plotly has rendered it. */
export async function draw(el, traces, layout) {
  const Plotly = await plotlyReady();
  return Plotly.react(el, traces, layout, PLOT_CONFIG);
}
