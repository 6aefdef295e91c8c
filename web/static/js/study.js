// Study page: speed-up over the baseline vs model size per optimizer (tokens and wall-clock), the
// results table with study.csv, and per scale the loss-vs-tokens chart (the baseline's curve over
// its budgets, each optimizer's winner) and the tuning grids with the winners starred. Everything
// comes from GET /studies/{id}, whose report the server recomputes from the runs; the page polls
// while the study runs and stops once it has ended.

import { API, Poller, errorText, get } from './api.js';
import { baseLayout, colorMap, draw, plotlyText } from './charts.js';
import { ACTIVE, connectionStatus, initKeyBox, statusBadge } from './common.js';
import { $, banner, fill, h } from './dom.js';
import { fixed } from './format.js';

const root = $('#study-root');
const studyId = Number(root.dataset.studyId);
const BOUND_SYMBOL = { '=': 'circle', '>': 'triangle-up', '<': 'triangle-down' };

const finite = (v) => typeof v === 'number' && Number.isFinite(v);

/** One colour per optimizer, the same as on the job pages and in the PNGs (server/palette.py). */
function colors(report) {
  const names = report.scales.length ? report.scales[0].optimizers.map((r) => r.optimizer) : [];
  return colorMap(names.map((name) => [name, name]));
}

function pointText(point) {
  if (!point) return '–';
  return Object.keys(point).sort().map((k) => `${k}=${point[k]}`).join(', ') || '(defaults)';
}

/** One trace per optimizer: speed-up (key 'token_speedup' or 'time_speedup') against parameters. */
export function speedupTraces(report, key, colorOf) {
  const names = [...colorOf.keys()];
  return names.map((name) => {
    const xs = [];
    const ys = [];
    const errs = [];
    const symbols = [];
    const texts = [];
    for (const scale of report.scales) {
      const row = scale.optimizers.find((r) => r.optimizer === name);
      const s = row && row[key];
      if (!s || !finite(s.value)) continue;
      xs.push(finite(scale.parameters) ? scale.parameters : scale.name);
      ys.push(s.value);
      errs.push(finite(s.std) ? s.std : 0);
      symbols.push(BOUND_SYMBOL[s.bound] || 'circle');
      texts.push(`${scale.name}: ${s.text}`);
    }
    return {
      type: 'scatter', mode: 'lines+markers', name: plotlyText(name), x: xs, y: ys,
      error_y: { type: 'data', array: errs, visible: true },
      marker: { symbol: symbols, size: 10, color: colorOf.get(name) }, line: { color: colorOf.get(name) },
      text: texts.map(plotlyText), hovertemplate: '%{text}<extra>%{fullData.name}</extra>',
    };
  });
}

/** The baseline's loss over its budgets plus each optimizer's winner (tokens, loss ± std). */
export function lossTokenTraces(scale, baseline, colorOf) {
  const curve = scale.baseline_curve.filter((p) => finite(p.loss_mean));
  const traces = [{
    type: 'scatter', mode: 'lines+markers', name: plotlyText(`${baseline} at ${curve.map((p) => `${p.multiplier}×`).join(', ')}`),
    x: curve.map((p) => p.tokens), y: curve.map((p) => p.loss_mean),
    error_y: { type: 'data', array: curve.map((p) => (finite(p.loss_std) ? p.loss_std : 0)), visible: true },
    line: { color: '#555555', dash: 'dash' }, marker: { color: '#555555' },
  }];
  for (const row of scale.optimizers) {
    if (!finite(row.loss_mean) || !finite(row.tokens)) continue;
    traces.push({
      type: 'scatter', mode: 'markers', name: plotlyText(row.optimizer), x: [row.tokens], y: [row.loss_mean],
      error_y: { type: 'data', array: [finite(row.loss_std) ? row.loss_std : 0], visible: true },
      marker: { size: 11, color: colorOf.get(row.optimizer) },
    });
  }
  return traces;
}

/** Final loss of every first-seed sweep point per optimizer; the winner starred. */
export function gridTraces(scale, colorOf) {
  const traces = [];
  for (const row of scale.optimizers) {
    const keys = [...new Set(row.sweep.flatMap((s) => Object.keys(s.point)))].sort();
    const numeric = keys.length === 1 && row.sweep.every((s) => finite(s.point[keys[0]]));
    const xOf = (point) => (numeric ? point[keys[0]] : pointText(point));
    const done = row.sweep.filter((s) => finite(s.loss));
    const color = colorOf.get(row.optimizer);
    traces.push({
      type: 'scatter', mode: 'lines+markers', name: plotlyText(row.optimizer), legendgroup: plotlyText(row.optimizer),
      x: done.map((s) => xOf(s.point)), y: done.map((s) => s.loss), marker: { color, size: 7 }, line: { color, width: 1 },
      text: done.map((s) => plotlyText(pointText(s.point))), hovertemplate: '%{text}: %{y:.4f}<extra>%{fullData.name}</extra>',
    });
    const winner = done.find((s) => row.winner && pointText(s.point) === pointText(row.winner));
    if (winner) {
      traces.push({
        type: 'scatter', mode: 'markers', name: plotlyText(`${row.optimizer} winner`), legendgroup: plotlyText(row.optimizer),
        showlegend: false, x: [xOf(winner.point)], y: [winner.loss],
        marker: { symbol: 'star', size: 16, color, line: { color: '#000000', width: 1 } },
        hovertemplate: `winner ${plotlyText(pointText(winner.point))}<extra></extra>`,
      });
    }
  }
  return traces;
}

/** The swept hyperparameter's name when every optimizer sweeps the same single one. */
function gridKey(scale) {
  const keys = new Set(scale.optimizers.flatMap((row) => row.sweep.flatMap((s) => Object.keys(s.point))));
  return keys.size === 1 ? [...keys][0] : 'sweep point';
}

function gridIsLog(scale) {
  return scale.optimizers.every((row) => {
    const keys = [...new Set(row.sweep.flatMap((s) => Object.keys(s.point)))];
    return keys.length === 1 && row.sweep.every((s) => finite(s.point[keys[0]]) && s.point[keys[0]] > 0);
  });
}

function renderHeader(study) {
  fill($('#study-title'), study.name, ' ', statusBadge(study.status));
  document.title = `Study ${study.id} · dykaf-lab`;
  const spec = study.spec;
  fill($('#study-meta'),
    h('span', { text: `baseline ${spec.baseline} at ${[1, ...spec.budgets].map((m) => `${m}×`).join(', ')} the tokens` }),
    h('span', { text: `${spec.seeds.length} seeds` }),
    h('span', {}, 'jobs: ', study.jobs.map((j, i) => [i ? ', ' : '', h('a', { href: `/jobs/${j.id}`, text: `${j.scale} (#${j.id})` })])),
    study.reason ? h('span', { text: study.reason }) : null);
  fill($('#study-warnings'), study.warnings.map((w) => h('li', { class: 'warn', text: w })));
  $('#study-csv').setAttribute('href', `${API}/studies/${study.id}/study.csv`);
}

function renderTable(report) {
  const rows = [];
  for (const scale of report.scales) {
    for (const row of scale.optimizers) {
      const loss = finite(row.loss_mean) ? `${fixed(row.loss_mean, 4)}${finite(row.loss_std) ? ` ± ${fixed(row.loss_std, 4)}` : ''}` : '–';
      rows.push(h('tr', { dataset: { scale: scale.name, optimizer: row.optimizer } },
        h('td', { text: scale.name }),
        h('td', { text: row.optimizer }),
        h('td', { text: pointText(row.winner), title: row.edges.join('\n') || null, class: row.edges.length ? 'warn' : null }),
        h('td', { class: 'mono', text: loss }),
        h('td', { text: `${row.seeds}${row.pending ? ` (+${row.pending} pending)` : ''}` }),
        h('td', { class: 'mono', dataset: { col: 'token' }, text: row.token_speedup ? row.token_speedup.text : '–' }),
        h('td', { class: 'mono', dataset: { col: 'time' }, text: row.time_speedup ? row.time_speedup.text : '–' })));
    }
  }
  fill($('#study-table tbody'), rows);
}

async function renderCharts(report) {
  const colorOf = colors(report);
  const hasParams = report.scales.every((s) => finite(s.parameters));
  const xTitle = hasParams ? 'parameters' : 'scale';
  const speedLayout = (title) => {
    const layout = baseLayout({ title, xTitle, yTitle: `speed-up over ${report.baseline} (×)` });
    if (hasParams) layout.xaxis.type = 'log';
    layout.shapes = [{ type: 'line', xref: 'paper', x0: 0, x1: 1, y0: 1, y1: 1, line: { color: '#999999', dash: 'dot', width: 1 } }];
    return layout;
  };
  await draw($('#chart-speedup'), speedupTraces(report, 'token_speedup', colorOf), speedLayout('Token speed-up vs model size'));
  await draw($('#chart-time-speedup'), speedupTraces(report, 'time_speedup', colorOf), speedLayout('Wall-clock speed-up vs model size'));
  const box = $('#scale-charts');
  for (const scale of report.scales) {
    let block = box.querySelector(`[data-scale="${CSS.escape(scale.name)}"]`);
    if (!block) {
      block = h('div', { class: 'chart-grid', dataset: { scale: scale.name } },
        h('div', { class: 'chart-box' }, h('div', { class: 'chart loss-tokens', role: 'img', 'aria-label': `${scale.name}: loss vs tokens` })),
        h('div', { class: 'chart-box' }, h('div', { class: 'chart grid', role: 'img', 'aria-label': `${scale.name}: tuning grid` })));
      box.append(block);
    }
    const lossLayout = baseLayout({ title: `${scale.name}: final val loss vs tokens`, xTitle: 'tokens', yTitle: 'final val loss' });
    lossLayout.xaxis.type = 'log';
    await draw(block.querySelector('.loss-tokens'), lossTokenTraces(scale, report.baseline, colorOf), lossLayout);
    const gridLayout = baseLayout({ title: `${scale.name}: tuning grid (first seed)`, xTitle: gridKey(scale), yTitle: 'final val loss' });
    if (gridIsLog(scale)) gridLayout.xaxis.type = 'log';
    await draw(block.querySelector('.grid'), gridTraces(scale, colorOf), gridLayout);
  }
}

let lastStatus = null;
let gone = false;

async function refresh() {
  const study = await get(`/studies/${studyId}`);
  lastStatus = study.status;
  fill($('#study-banner'));
  renderHeader(study);
  renderTable(study.report);
  await renderCharts(study.report);
  root.dataset.rendered = study.status;
}

function start() {
  initKeyBox();
  const poller = new Poller(async () => {
    try {
      await refresh();
    } catch (err) {
      if (err && err.status === 404) {
        gone = true;
        fill($('#study-banner'), banner('error', `Study ${studyId} not found.`));
        return;
      }
      fill($('#study-banner'), banner('error', errorText(err)));
      throw err;
    }
  }, {
    interval: () => (!gone && (lastStatus === null || ACTIVE.has(lastStatus)) ? 3000 : 0),
    onStatus: (s, info) => connectionStatus(s, info),
  });
  poller.start();
}

start();
