// Job page: header and actions, loss curves (mean ± band across seeds, seeds on demand, x by
// step / seconds / tokens, log-y, EMA), summary table, Fisher fidelity, runs table, CSV exports.
// Everything updates live while the job runs and stops polling once it has ended. The summary, the
// winner and the Fisher verdict are the server's (GET /jobs/{id}/summary); the page lays them out,
// fetched in the same refresh as the curves so that both show one state.

import { ApiError, Poller, errorText, get, getKey } from './api.js';
import {
  aggregateTraces, baseLayout, colorMap, draw, fisherLabelTraces, fisherLayers, fisherMeans,
  METHOD_ORDER, fisherMethodTraces, fisherSnapshot, methodName, plotlyReady, seedTraces,
  targetShapes,
} from './charts.js';
import { ACTIVE, TERMINAL, connectionStatus, initKeyBox, jobActionButtons, onKeyChange, progressBar, statusBadge, toast } from './common.js';
import { $, $$, banner, fill, h, stateBlock } from './dom.js';
import { dateTime, duration, fixed, int, meanStd, num, percent, speedup } from './format.js';
import { SUMMARY_COLUMNS, interpolator, rowStat, tokensPerStep } from './stats.js';

const root = $('#job-root');
const jobId = Number(root.dataset.jobId);
const VIEW_KEY = 'dykaf.jobView';
const LOSS_NAMES = ['train_loss', 'val_loss'];
// Task-quality metrics (higher is better) of classify / instruct jobs, with their display titles.
const QUALITY_TITLES = {
  val_accuracy: 'Val accuracy', val_f1: 'Val macro-F1', val_mcc: 'Val Matthews corr.', val_exact_match: 'Val exact match',
};

/** The metric a classify/instruct job is judged by (null for loss-only tasks). On the first load the
 * curves are fetched before the job itself, but after the summary, which names it. */
function qualityMetric(job) {
  const primary = state.summary && state.summary.primary;
  if (primary && QUALITY_TITLES[primary.name]) return primary.name;
  const task = (job && job.spec && job.spec.task) || {};
  if (task.kind === 'classify') return (task.classify && task.classify.primary_metric) || 'val_accuracy';
  if (task.kind === 'instruct') return 'val_exact_match';
  return null;
}
const FISHER_METRICS = ['kron_rel_err', 'precond_rel_err', 'diag_mass'];
const CHART_REFRESH_MS = 2500;

const state = {
  job: null,
  colors: new Map(),
  agg: null, // aggregates (mean/min/max/std across seeds) for the loss curves
  seeds: null, // per-run series, fetched only when "individual seeds" is on
  time: null, // train_time aggregates and per-run series for the wall-clock axis
  fisher: null, // Map from fisherMeans
  summary: null, // GET /jobs/{id}/summary, fetched just before the curves it is shown with
  fisherNote: '',
  chartsStepsDone: -1,
  chartsAt: 0,
  chartsEvery: CHART_REFRESH_MS,
  chartsFor: null,
  firstRender: true,
  gone: false,
  view: loadView(),
};

function loadView() {
  const defaults = { x: 'step', band: 'minmax', logY: false, seeds: false, smoothing: 0 };
  try {
    return { ...defaults, ...JSON.parse(localStorage.getItem(VIEW_KEY) || '{}') };
  } catch {
    return defaults;
  }
}

function saveView() {
  try {
    localStorage.setItem(VIEW_KEY, JSON.stringify(state.view));
  } catch {
    /* ignore */
  }
}

// ------------------------------------------------------------------ data

function labelsInOrder(job) {
  const labels = [];
  for (const run of job.runs) if (!labels.includes(run.label)) labels.push(run.label);
  return labels;
}

function maxPoints() {
  const width = $('#chart-train').clientWidth || 600;
  return Math.max(150, Math.min(1000, Math.round(width / 2)));
}

async function fetchSummary() {
  state.summary = await get(`/jobs/${jobId}/summary`);
}

/** The summary first, then the curves: a run the summary counts as ended has written all its
 * points before it ended, so the curves fetched after it include them. */
async function fetchSnapshot() {
  await fetchSummary();
  await fetchCurves();
}

async function fetchCurves() {
  const v = state.view;
  const names = [...LOSS_NAMES];
  const quality = qualityMetric(state.job);
  if (quality) names.push(quality);
  const points = maxPoints();
  const requests = [get(`/jobs/${jobId}/metrics`, { name: names, view: 'aggregate', max_points: points })];
  requests.push(v.seeds ? get(`/jobs/${jobId}/metrics`, { name: names, view: 'runs', max_points: points }) : null);
  // Wall-clock axis: cumulative training seconds per step, coarse is plenty for interpolation.
  requests.push(v.x === 'time'
    ? get(`/jobs/${jobId}/metrics`, { name: 'train_time', view: v.seeds ? 'both' : 'aggregate', max_points: 200 })
    : null);
  const [agg, seeds, time] = await Promise.all(requests);
  state.agg = agg;
  state.seeds = seeds;
  state.time = time;
}

function fisherEnabled(job) {
  return Boolean(job.spec && job.spec.task && job.spec.task.fisher_every > 0);
}

async function fetchFisher() {
  const job = state.job;
  if (!fisherEnabled(job)) {
    state.fisher = null;
    state.fisherNote = 'Fisher diagnostics were not enabled for this job (task.fisher_every = 0).';
    return;
  }
  const label = $('#fisher-label').value;
  const runIds = job.runs.filter((r) => r.label === label).map((r) => r.id);
  // kron_rel_err of every run (the table by gradient stream), diag_mass of the selected label's.
  const [kron, diag, own] = await Promise.all([
    get(`/jobs/${jobId}/fisher`, { metric: 'kron_rel_err' }),
    runIds.length ? get(`/jobs/${jobId}/fisher`, { run_id: runIds, metric: 'diag_mass' }) : { series: [] },
    get(`/jobs/${jobId}/fisher`, { metric: 'precond_rel_err', method: 'own' }),
  ]);
  state.fisher = fisherMeans([...kron.series, ...diag.series, ...own.series]);
  state.fisherNote = state.fisher.size === 0
    ? (ACTIVE.has(job.status) ? 'No Fisher diagnostics yet; they appear every task.fisher_every steps and at the last step.' : 'No Fisher diagnostics were recorded.')
    : '';
}

// ------------------------------------------------------------------ header, runs, summary

/** Per-device micro-batch × accumulation, and the devices when a run spans several. */
function batchText(task) {
  const devices = Number(task.devices_per_run) || 1;
  const base = `${task.batch_size}×${task.grad_accum}`;
  return devices > 1 ? `${base} × ${devices} devices (${task.distributed || 'shard'})` : base;
}

function renderHeader(job) {
  document.title = `${job.name} · job ${job.id} · dykaf-lab`;
  fill($('#job-title'), h('span', { text: job.name }), ' ', statusBadge(job.status));
  const spec = job.spec || {};
  const task = spec.task || {};
  const corpus = task.corpus || {};
  const model = task.kind === 'finetune'
    ? `fine-tune ${(task.finetune && task.finetune.model) || ''}`
    : `GPT ${task.n_layer}×${task.d_model} (${task.n_head} heads), context ${task.context}`;
  const meta = [
    ['job', `#${job.id}`],
    ['task', model],
    ['data', `${corpus.name || '?'}${corpus.name === 'hf' && corpus.hf_name ? ` ${corpus.hf_name}` : ''} · ${(task.tokenizer && task.tokenizer.kind) || ''} tokens`],
    ['steps', int(task.steps)],
    ['batch', batchText(task)],
    ['seeds', (spec.seeds || []).join(', ')],
    ['target', spec.target_loss ?? '–'],
    ['device', spec.device || 'auto'],
    ['created', dateTime(job.created_at)],
    ['finished', job.finished_at ? dateTime(job.finished_at) : '–'],
  ];
  fill($('#job-meta'), meta.map(([k, v]) => h('span', {}, `${k} `, h('b', { text: v }))),
    job.rerun_of ? h('span', {}, 'rerun of ', h('a', { href: `/jobs/${Number(job.rerun_of)}`, text: `#${job.rerun_of}` })) : null);
  const actions = jobActionButtons(job, (kind, result) => {
    if (kind === 'delete') window.location.href = '/';
    else if (kind === 'rerun' && result && result.id) window.location.href = `/jobs/${result.id}`;
    else poller.now();
  });
  const copy = h('a', { class: 'button', href: `/new?from=${Number(job.id)}`, dataset: { action: 'copy' }, text: 'Edit as new job', title: 'Open the form with this job\'s spec' });
  fill($('#job-actions'), copy, actions.length ? actions : h('span', { class: 'muted small no-print', text: 'Set an API key to cancel, rerun or delete.' }));
  fill($('#job-progress'), progressBar(job.progress, job.status),
    job.cancel_requested && ACTIVE.has(job.status) ? h('div', { class: 'muted small', text: 'Cancellation requested; runs stop at their next step.' }) : null,
    job.reason && job.status !== 'succeeded' ? h('div', { class: 'reason', text: job.reason }) : null,
    (job.warnings || []).map((w) => banner('warn', w)));
}

function renderRuns(job) {
  if (!job.runs.length) {
    fill($('#runs-wrap'), stateBlock('empty', 'This job has no runs.'));
    return;
  }
  const head = ['#', 'Label', 'Seed', 'Status', 'Progress', 'Attempt', 'Worker', 'Device', 'Started', 'Run time', 'Reason'];
  const rows = job.runs.map((r) => h('tr', { dataset: { runId: r.id, status: r.status } },
    h('td', { class: 'num', text: r.index }),
    h('td', {}, h('span', { text: r.label }), Object.keys(r.sweep_point || {}).length ? h('div', { class: 'muted small mono', text: JSON.stringify(r.sweep_point) }) : null),
    h('td', { class: 'num', text: r.seed }),
    h('td', {}, statusBadge(r.status), r.cancel_requested && ACTIVE.has(r.status) ? h('div', { class: 'muted small', text: 'cancelling…' }) : null),
    h('td', { class: 'num', text: `${int(r.step)} / ${int(r.total_steps)}` }),
    h('td', { class: 'num', text: r.attempt }),
    h('td', { class: 'mono small', text: r.worker || '–' }),
    h('td', { class: 'mono small', text: r.device || '–' }),
    h('td', { class: 'nowrap small', text: r.started_at ? dateTime(r.started_at) : '–' }),
    h('td', { class: 'num', text: duration(r.run_seconds) }),
    h('td', {}, r.reason ? h('div', { class: 'reason', text: r.reason }) : h('span', { class: 'muted', text: '–' }))));
  fill($('#runs-wrap'), h('table', { id: 'runs-table' },
    h('thead', {}, h('tr', {}, head.map((t, i) => h('th', { class: [0, 2, 4, 5, 9].includes(i) ? 'num' : '', text: t })))),
    h('tbody', {}, rows)));
}

const finiteNum = (v) => typeof v === 'number' && Number.isFinite(v);

function cellContent(row, column) {
  const ended = row.seeds - row.pending;
  switch (column.kind) {
    case 'stat': {
      const v = rowStat(row, column.key);
      const text = meanStd(v, column.digits === undefined ? 3 : column.digits);
      if (!column.target) return text;
      if (!row.succeeded) return '–';
      if (!v.n) return ['not reached', h('div', { class: 'muted small', text: `0/${row.succeeded} finished seeds` })];
      return [text, h('div', { class: 'muted small', text: `${row.reached_target}/${row.succeeded} finished seeds reached` })];
    }
    case 'ratio': {
      const v = finiteNum(row[column.key]) ? row[column.key] : NaN;
      return row.baseline && column.key === 'speedup_steps'
        ? [speedup(v), h('div', { class: 'muted small', text: 'baseline' })]
        : speedup(v);
    }
    case 'percent': {
      const v = row[`${column.key}_mean`];
      return percent(finiteNum(v) ? v : NaN, 1);
    }
    case 'count':
      return ended ? `${row[column.key]} / ${ended}` : '–';
    default:
      return num(row[column.key]);
  }
}

/** "1/2 finished" and, under it, the runs not in the means: stopped early or still to come. */
function runsCell(row) {
  const notes = [];
  if (row.partial) notes.push(h('div', { class: 'muted small partial', text: `${row.partial} stopped early (not averaged)` }));
  if (row.pending) notes.push(h('div', { class: 'muted small', text: `${row.pending} still to run` }));
  return [`${row.succeeded}/${row.seeds}`, ...notes];
}

/** Labels whose loss curves are in the charts' data: while the job runs, a summary row is shown
 * only once its curves are (the curves' read may lag the summary's by a cache period). */
function chartedLabels() {
  return new Set(((state.agg && state.agg.aggregates) || []).map((a) => a.label));
}

function renderSummary(job) {
  const summary = state.summary;
  if (!summary || !summary.rows.length) {
    fill($('#summary-wrap'), stateBlock('empty', 'No runs yet.'));
    return;
  }
  const target = summary.target_metric !== undefined ? summary.target_metric : summary.target_loss;
  const charted = chartedLabels();
  const live = ACTIVE.has(job.status);
  const rows = summary.rows.filter((row) => !live || charted.has(row.label));
  const waiting = summary.rows.length - rows.length;
  const quality = Object.keys(QUALITY_TITLES)
    .filter((n) => summary.rows.some((r) => r[`final_${n}_mean`] !== undefined))
    .map((n) => ({ key: `final_${n}`, title: `Final ${QUALITY_TITLES[n].toLowerCase()}`, better: 'max', kind: 'stat' }));
  const columns = quality.concat(SUMMARY_COLUMNS.filter((c) => !c.target || (target !== null && target !== undefined)));
  const best = summary.best || {};
  const isBest = (c, row) => (best[c.key] || []).includes(row.label);
  const table = rows.length ? h('table', { id: 'summary-table' },
    h('thead', {}, h('tr', {}, h('th', { text: 'Optimizer' }),
      h('th', { class: 'num', text: 'Finished', title: 'runs that completed their schedule / runs; only these are averaged' }),
      columns.map((c) => h('th', { class: 'num', text: c.title, title: c.hint || (c.better === 'max' ? 'higher is better' : 'lower is better') })))),
    h('tbody', {}, rows.map((row) => h('tr', { dataset: { label: row.label, partial: row.partial ? 'true' : 'false' } },
      h('td', {}, h('span', { class: 'nowrap' }, h('span', { class: 'swatch', style: { color: state.colors.get(row.label) }, text: '■ ' }), h('span', { text: row.label })),
        row.label !== row.optimizer ? h('div', { class: 'muted small', text: row.optimizer }) : null),
      h('td', { class: 'num', dataset: { col: 'runs' } }, runsCell(row)),
      columns.map((c) => h('td', { class: `num${isBest(c, row) ? ' best' : ''}`, dataset: { col: c.key } }, cellContent(row, c)))))))
    : stateBlock('empty', 'Waiting for the first curves…');
  const notes = [];
  if (summary.runs.partial) notes.push('Runs that stopped early (cancelled, failed or diverged) are counted but not averaged with finished ones.');
  if (summary.runs.pending) notes.push('Runs still in progress are not counted yet; the table fills in as they finish.');
  if (waiting) notes.push(`${waiting} configuration${waiting === 1 ? '' : 's'} not listed until ${waiting === 1 ? 'its' : 'their'} curves arrive.`);
  fill($('#summary-wrap'),
    summary.winner_text ? h('p', { id: 'summary-winner' }, h('b', { text: 'Best: ' }), h('span', { text: summary.winner_text })) : null,
    table,
    notes.map((text) => h('p', { class: 'muted small', text })));
}

// ------------------------------------------------------------------ charts

function xMapper() {
  const v = state.view;
  const job = state.job;
  if (v.x === 'tokens') {
    const per = tokensPerStep(job.spec && job.spec.task) || 1;
    return { title: 'tokens', of: (_label, steps) => steps.map((s) => s * per) };
  }
  if (v.x === 'time' && state.time) {
    const byLabel = new Map();
    for (const a of state.time.aggregates || []) byLabel.set(a.label, interpolator(a.step, a.mean));
    const byRun = new Map();
    for (const s of state.time.series || []) byRun.set(s.run_id, interpolator(s.step, s.value));
    return {
      title: 'training seconds',
      of: (label, steps, runId) => {
        const f = (runId !== undefined && byRun.get(runId)) || byLabel.get(label);
        return f ? steps.map((s) => f(s)) : steps.map(() => null);
      },
    };
  }
  return { title: 'step', of: (_label, steps) => steps };
}

function qualityChart(x) {
  const name = qualityMetric(state.job);
  const box = $('#chart-quality-box');
  if (!box) return null;
  box.hidden = !name;
  if (!name) return null;
  const v = state.view;
  const opts = { name, colors: state.colors, xOf: x.of, smoothing: v.smoothing, band: v.band };
  let traces = aggregateTraces((state.agg && state.agg.aggregates) || [], opts);
  if (v.seeds && state.seeds) traces = traces.concat(seedTraces(state.seeds.series || [], opts));
  const empty = traces.length ? null : (ACTIVE.has(state.job.status) ? 'Waiting for the first evaluation…' : 'No data recorded.');
  const title = `${QUALITY_TITLES[name]} (higher is better)`;
  return draw($('#chart-quality'), traces, baseLayout({ title, xTitle: x.title, yTitle: name, logY: false, empty, uirevision: v.x }));
}

function lossChart(el, name, title, x) {
  const v = state.view;
  const opts = { name, colors: state.colors, xOf: x.of, smoothing: v.smoothing, band: v.band };
  let traces = aggregateTraces((state.agg && state.agg.aggregates) || [], opts);
  if (v.seeds && state.seeds) traces = traces.concat(seedTraces(state.seeds.series || [], opts));
  const empty = traces.length ? null
    : (ACTIVE.has(state.job.status) ? `Waiting for the first ${name === 'val_loss' ? 'evaluation' : 'logged step'}…` : 'No data recorded.');
  const layout = baseLayout({ title, xTitle: x.title, yTitle: 'loss', logY: v.logY, empty, uirevision: `${v.x}|${v.logY}` });
  const target = state.job.spec ? state.job.spec.target_loss : null;
  if (!empty && target) Object.assign(layout, targetShapes(target, v.logY));
  return draw(el, traces, layout);
}

function ensureFisherLabels(job) {
  const select = $('#fisher-label');
  const labels = labelsInOrder(job);
  const current = [...select.options].map((o) => o.value);
  if (current.join('\u0000') === labels.join('\u0000')) return;
  const preferred = select.value
    || job.runs.find((r) => r.optimizer.startsWith('dykaf'))?.label
    || labels[0];
  fill(select, labels.map((l) => h('option', { value: l, text: l })));
  select.value = labels.includes(preferred) ? preferred : labels[0];
}

/** The server's verdict on one configuration's gradients (``summary.fisher.by_label``), method
 * names in bold. */
function fisherVerdict(gaps) {
  if (!gaps || !gaps.verdict) return [];
  const parts = [gaps.verdict];
  for (const { name } of gaps.gaps) {
    const last = parts.pop();
    const found = [': ', '· '].map((sep) => last.indexOf(`${sep}${name} `)).filter((i) => i >= 0);
    if (!found.length) {
      parts.push(last);
      continue;
    }
    const at = Math.min(...found) + 2;
    parts.push(last.slice(0, at), h('b', { text: name }), last.slice(at + name.length));
  }
  return parts;
}

/** The verdict's numbers (the server's gaps by label) on every configuration's gradients, one row
 * each (shown when there are several): whether DyKAF's factors track the Fisher better holds beyond
 * one gradient stream. */
function renderFisherStreams(gapsByLabel) {
  const box = $('#fisher-streams');
  const rows = [...gapsByLabel].filter(([, g]) => g && g.gaps.length);
  box.classList.toggle('hidden', rows.length < 2);
  if (rows.length < 2) return;
  const measured = new Set(rows.flatMap(([, g]) => g.gaps.map((x) => x.method)));
  const methods = METHOD_ORDER.filter((m) => measured.has(m));
  const head = h('tr', {}, h('th', { text: 'gradients of' }),
    methods.map((m) => h('th', { class: 'num', text: methodName(m) })),
    h('th', { class: 'num', text: 'share of SOAP/Shampoo\'s gap DyKAF closes' }));
  const body = rows.map(([label, { gaps, closed }]) => h('tr', { dataset: { label } },
    h('td', { text: label }),
    methods.map((m) => h('td', { class: 'num', text: fixed(gaps.find((x) => x.method === m)?.gap ?? null, 4) })),
    h('td', { class: 'num', text: closed === null ? '–' : percent(closed) })));
  fill($('table', box), h('thead', {}, head), h('tbody', {}, body));
}

/** Layout of a one-report Fisher chart (``fisherSnapshot``): methods down, values across, the
 * floor (optimal Kronecker product) as a dashed line where the chart has one. */
function snapshotLayout(title, metric, snapshot, label) {
  const layout = baseLayout({ title: `${title} · step ${snapshot.step}`, xTitle: metric, yTitle: '', uirevision: `${label}:snapshot`, height: 290, compact: true });
  layout.showlegend = false; // the y axis names every method
  layout.yaxis.type = 'category';
  if (snapshot.floor !== null) {
    layout.shapes = [{ type: 'line', xref: 'x', x0: snapshot.floor, x1: snapshot.floor, yref: 'paper', y0: 0, y1: 1, line: { color: '#222222', width: 1, dash: 'dash' } }];
  }
  return layout;
}

async function renderFisher() {
  const rootEl = $('#fisher-root');
  if (!state.fisher || state.fisher.size === 0) {
    fill($('#fisher-verdict'));
    renderFisherStreams(new Map());
    $('#fisher-controls').classList.toggle('hidden', !fisherEnabled(state.job));
    fill(rootEl, stateBlock('empty', state.fisherNote || 'No Fisher diagnostics.'));
    return;
  }
  $('#fisher-controls').classList.remove('hidden');
  const label = $('#fisher-label').value;
  const byLabel = (state.summary && state.summary.fisher && state.summary.fisher.by_label) || {};
  const gapsByLabel = new Map(labelsInOrder(state.job).map((l) => [l, byLabel[l]]));
  fill($('#fisher-verdict'), fisherVerdict(gapsByLabel.get(label))); // the select lists these labels
  renderFisherStreams(gapsByLabel);
  const layers = fisherLayers(state.fisher);
  const wanted = layers.join('\u0000');
  if (rootEl.dataset.layers !== wanted) {
    rootEl.dataset.layers = wanted;
    fill(rootEl, layers.map((layer) => h('div', { class: 'fisher-layer', dataset: { layer } },
      h('div', { class: 'layer-title', text: layer }),
      h('div', { class: 'chart-grid three' }, FISHER_METRICS.map((metric) => h('div', { class: 'chart-box' },
        h('div', { class: 'chart small', dataset: { chart: `fisher:${metric}:${layer}`, metric, layer } })))))));
  }
  const draws = [];
  for (const el of $$('.fisher-layer .chart', rootEl)) {
    const { metric, layer } = el.dataset;
    const traces = metric === 'precond_rel_err'
      ? fisherLabelTraces(state.fisher, { layer, metric, colors: state.colors })
      : fisherMethodTraces(state.fisher, { layer, metric, label });
    const titles = {
      kron_rel_err: `kron_rel_err — ${label}`,
      precond_rel_err: 'precond_rel_err — each optimizer\'s own',
      diag_mass: `diag_mass — ${label}`,
    };
    const empty = traces.length ? null : (metric === 'precond_rel_err' ? 'No optimizer here exposes its preconditioner' : 'No values for this layer');
    const snapshot = fisherSnapshot(traces);
    if (snapshot) {
      draws.push(draw(el, snapshot.traces, snapshotLayout(titles[metric], metric, snapshot, label)));
    } else {
      draws.push(draw(el, traces, baseLayout({ title: titles[metric], xTitle: '', yTitle: metric, empty, uirevision: label, height: 290, compact: true })));
    }
  }
  await Promise.all(draws);
}

async function renderCharts() {
  renderSummary(state.job); // from the same refresh as the curves
  const x = xMapper();
  await Promise.all([
    lossChart($('#chart-train'), 'train_loss', 'Training loss', x),
    lossChart($('#chart-val'), 'val_loss', 'Validation loss', x),
    qualityChart(x),
    renderFisher(),
  ]);
  const width = state.agg ? state.agg.bucket_width : 1;
  const source = state.agg && String(state.agg.source || '').startsWith('rollup') ? ', read from pre-bucketed rollups' : '';
  $('#curves-note').textContent = width > 1
    ? `Each point summarises ${width} steps (bucket mean${source}; the min–max band keeps spikes visible). The CSV exports have every point.`
    : '';
  if (state.firstRender) {
    state.firstRender = false;
    performance.mark('dykaf:charts-rendered');
    document.body.dataset.charts = 'ready';
  }
  document.body.dataset.chartsVersion = String(Number(document.body.dataset.chartsVersion || 0) + 1);
}

function chartError(err) {
  const message = `Charts could not be loaded: ${errorText(err)}`;
  for (const el of [$('#chart-train'), $('#chart-val')]) {
    if (!el.classList.contains('js-plotly-plot')) fill(el, stateBlock('error', 'Chart unavailable', errorText(err)));
  }
  fill($('#job-banner'), banner('error', message, h('button', { type: 'button', class: 'small', text: 'Retry', onclick: () => refreshCharts(true) })));
}

async function refreshCharts(force = false, curves = null) {
  const job = state.job;
  if (!job) return;
  const key = JSON.stringify(state.view) + $('#fisher-label').value;
  const due = force || key !== state.chartsFor
    || (job.progress.steps_done !== state.chartsStepsDone && Date.now() - state.chartsAt >= state.chartsEvery)
    || (TERMINAL.has(job.status) && state.chartsStatus !== job.status);
  if (!due) return;
  const stepsDone = job.progress.steps_done;
  const status = job.status;
  const started = performance.now();
  await Promise.all([curves || fetchSnapshot(), fetchFisher()]);
  // A big running job makes every refresh cost the server a scan: refresh no more often than
  // every CHART_REFRESH_MS, and back off further when the last refresh took long.
  state.chartsEvery = Math.max(CHART_REFRESH_MS, 5 * (performance.now() - started));
  if (state.firstRender) performance.mark('dykaf:data-ready');
  state.chartsFor = key;
  state.chartsStepsDone = stepsDone;
  state.chartsStatus = status;
  state.chartsAt = Date.now();
  await renderCharts();
}

// ------------------------------------------------------------------ polling

async function tick() {
  // On the first load the curves (which need nothing from the job) are fetched at the same time
  // as the job itself.
  const curves = state.job ? null : fetchSnapshot();
  if (curves) curves.catch(() => {}); // awaited below; a failure is reported there
  let job;
  try {
    job = await get(`/jobs/${jobId}`);
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      state.gone = true;
      poller.stop();
      fill(root, stateBlock('error', `Job ${jobId} not found.`, 'It may have been deleted.', h('div', { style: { marginTop: '.6rem' } }, h('a', { class: 'button', href: '/', text: 'All jobs' }))));
      return;
    }
    throw err;
  }
  const first = !state.job;
  state.job = job;
  state.colors = colorMap(job.runs.map((run) => [run.label, run.optimizer]));
  renderHeader(job);
  renderRuns(job);
  ensureFisherLabels(job);
  if (first) fill($('#job-banner'));
  try {
    await refreshCharts(first, curves);
    if ($('#job-banner').dataset.kind === 'charts') fill($('#job-banner'));
  } catch (err) {
    if (err instanceof ApiError && err.offline) throw err;
    chartError(err);
    $('#job-banner').dataset.kind = 'charts';
  }
}

const poller = new Poller(tick, {
  // Fast while anything runs; once ended (and the final curves are drawn) polling stops.
  interval: () => {
    if (state.gone || !state.job) return 0;
    if (ACTIVE.has(state.job.status)) return 2000;
    return state.chartsStatus === state.job.status ? 0 : 1000;
  },
  onStatus: (status, info) => {
    connectionStatus(status, info);
    if (status === 'offline' && !state.job) {
      fill($('#job-banner'), banner('error', `Could not load job ${jobId}: ${errorText(info.error)}. Retrying…`));
    } else if (status === 'offline') {
      fill($('#job-banner'), banner('warn', `Live updates paused: ${errorText(info.error)}. Retrying in ${Math.round(info.retryIn / 1000)} s.`,
        h('button', { type: 'button', class: 'small', text: 'Retry now', onclick: () => poller.now() })));
    } else {
      fill($('#job-banner'));
    }
  },
});

// ------------------------------------------------------------------ controls and downloads

function initControls() {
  const v = state.view;
  $('#x-axis').value = v.x;
  $('#band').value = v.band;
  $('#log-y').checked = v.logY;
  $('#show-seeds').checked = v.seeds;
  $('#smoothing').value = String(v.smoothing);
  $('#smoothing-value').textContent = Number(v.smoothing).toFixed(2);
  const changed = (refetch) => {
    saveView();
    if (!state.job) return;
    const work = refetch ? refreshCharts(true) : renderCharts();
    work.catch(chartError);
  };
  $('#x-axis').addEventListener('change', (e) => { v.x = e.target.value; changed(v.x === 'time'); });
  $('#band').addEventListener('change', (e) => { v.band = e.target.value; changed(false); });
  $('#log-y').addEventListener('change', (e) => { v.logY = e.target.checked; changed(false); });
  $('#show-seeds').addEventListener('change', (e) => { v.seeds = e.target.checked; changed(v.seeds); });
  let pending = null;
  $('#smoothing').addEventListener('input', (e) => {
    v.smoothing = Number(e.target.value);
    $('#smoothing-value').textContent = v.smoothing.toFixed(2);
    cancelAnimationFrame(pending);
    pending = requestAnimationFrame(() => changed(false));
  });
  $('#fisher-label').addEventListener('change', () => {
    if (!state.job) return;
    refreshCharts(true).catch(chartError);
  });
  for (const button of $$('[data-download]')) button.addEventListener('click', () => download(button));
  onKeyChange(() => {
    if (state.job) renderHeader(state.job);
    poller.now(); // e.g. reads need a key and the first load was refused
  });
  window.addEventListener('beforeprint', () => {
    if (window.Plotly) for (const el of $$('.js-plotly-plot')) window.Plotly.Plots.resize(el);
  });
}

async function download(button) {
  if (!state.job) return;
  const kind = button.dataset.download;
  const url = state.job.links[kind];
  const filename = `job-${jobId}-${kind.replace('_csv', '')}.csv`;
  if (!getKey()) {
    // A plain link streams straight to disk (a million rows never sit in page memory).
    const a = h('a', { href: url, download: filename });
    document.body.append(a);
    a.click();
    a.remove();
    return;
  }
  // With a key the request must carry it; fetch the file and hand the browser a blob.
  button.disabled = true;
  try {
    const response = await fetch(url, { headers: { Authorization: `Bearer ${getKey()}` } });
    if (!response.ok) throw new ApiError(response.status, (await response.json().catch(() => ({}))).detail);
    const blob = await response.blob();
    const href = URL.createObjectURL(blob);
    const a = h('a', { href, download: filename });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(href), 10000);
  } catch (err) {
    toast(`Download failed: ${errorText(err)}`, 'error');
  } finally {
    button.disabled = false;
  }
}

initKeyBox();
initControls();
poller.start();
// For the benchmark's breakdown: when Plotly.js (loading in parallel) has started up.
plotlyReady().then(() => performance.mark('dykaf:plotly-ready'), () => {});
