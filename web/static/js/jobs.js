// Jobs page: every job with status and progress, filters, live updates, write actions.

import { Poller, errorText, get, getKey } from './api.js';
import { ACTIVE, connectionStatus, initKeyBox, jobActionButtons, onKeyChange, progressBar, statusBadge } from './common.js';
import { $, banner, fill, h, stateBlock } from './dom.js';
import { dateTime, fixed, relative } from './format.js';

const PAGE = 50;
const FAST = 2000;
const SLOW = 10000;

const state = {
  items: [],
  nextCursor: null,
  extraPages: 0,
  specs: new Map(), // job id -> {optimizers, seeds, steps}; specs never change, so fetched once
  loaded: false,
  lastRender: '',
};

function filters() {
  return { status: $('#status-filter').value || undefined, name: $('#name-filter').value.trim() || undefined };
}

function writeFiltersToUrl() {
  const url = new URL(window.location.href);
  const { status, name } = filters();
  if (status) url.searchParams.set('status', status); else url.searchParams.delete('status');
  if (name) url.searchParams.set('name', name); else url.searchParams.delete('name');
  window.history.replaceState(null, '', url);
}

function readFiltersFromUrl() {
  const params = new URLSearchParams(window.location.search);
  if (params.get('status')) $('#status-filter').value = params.get('status');
  if (params.get('name')) $('#name-filter').value = params.get('name');
}

async function fetchSpecs(ids) {
  const missing = ids.filter((id) => !state.specs.has(id));
  if (missing.length === 0) return;
  const specs = await get('/ui/job-specs', { id: missing });
  for (const id of missing) state.specs.set(id, specs[String(id)] || null);
}

async function load() {
  // The first page plus any older pages the user asked for, refreshed together (the API caps a
  // page at 200 jobs, so more than that is read with its cursor).
  const wanted = PAGE * (1 + state.extraPages);
  const items = [];
  let cursor;
  let next = null;
  do {
    const page = await get('/jobs', { ...filters(), limit: Math.min(200, wanted - items.length), cursor });
    items.push(...page.items);
    next = page.next_cursor;
    cursor = next;
  } while (next && items.length < wanted);
  await fetchSpecs(items.map((j) => j.id));
  state.items = items;
  state.nextCursor = next;
  state.loaded = true;
  render();
}

function optimizerChips(spec) {
  if (!spec) return h('span', { class: 'muted', text: '–' });
  return h('div', { class: 'chips' }, spec.optimizers.map((o) => h('span', { class: 'chip', title: o.name, text: o.label })));
}

/** The best configuration by the job's primary metric (the server's ``winner``), once it ended. */
function winnerCell(job) {
  const w = job.winner;
  if (!w) return h('span', { class: 'muted', text: '–' });
  const spread = w.seeds > 1 && Number.isFinite(w.std) ? ` ± ${fixed(w.std, 3)}` : '';
  return [h('span', { class: 'winner', text: w.label }),
    h('div', { class: 'muted small', text: `${w.metric.replaceAll('_', ' ')} ${fixed(w.mean, 3)}${spread}` })];
}

function row(job) {
  const spec = state.specs.get(job.id);
  const actions = jobActionButtons(job, (kind, result) => {
    if (kind === 'rerun' && result && result.id) window.location.href = `/jobs/${result.id}`;
    else poller.now();
  }, { compact: true });
  return h('tr', { dataset: { jobId: job.id, status: job.status } },
    h('td', { class: 'num' }, h('a', { href: `/jobs/${Number(job.id)}`, text: job.id })),
    h('td', { class: 'name' },
      h('a', { href: `/jobs/${Number(job.id)}`, text: job.name }),
      job.rerun_of ? h('div', { class: 'muted small', text: `rerun of #${job.rerun_of}` }) : null,
      job.reason && job.status !== 'succeeded' ? h('div', { class: 'reason', text: job.reason }) : null),
    h('td', {}, statusBadge(job.status), job.cancel_requested && ACTIVE.has(job.status) ? h('div', { class: 'muted small', text: 'cancelling…' }) : null),
    h('td', {}, progressBar(job.progress, job.status)),
    h('td', {}, optimizerChips(spec)),
    h('td', { class: 'best-cell', dataset: { col: 'winner' } }, winnerCell(job)),
    h('td', { class: 'num', title: spec ? spec.seeds.join(', ') : '' , text: spec ? spec.seeds.length : '–' }),
    h('td', { class: 'nowrap', title: dateTime(job.created_at), text: relative(job.created_at) }),
    h('td', { class: 'nowrap', text: job.finished_at ? dateTime(job.finished_at) : '–' }),
    h('td', { class: 'actions' }, actions));
}

function render() {
  const body = $('#jobs-body');
  const stateEl = $('#jobs-state');
  // Re-render only when something visible changed (keeps focus and hover stable between polls).
  const signature = JSON.stringify([state.items, getKey() !== '', [...state.specs.keys()].length]);
  if (signature !== state.lastRender) {
    state.lastRender = signature;
    fill(body, state.items.map(row));
  }
  const { status, name } = filters();
  if (state.items.length === 0) {
    const filtered = status || name;
    fill(stateEl, filtered
      ? stateBlock('empty', 'No jobs match these filters.', status ? `No ${status} jobs${name ? ` named like “${name}”` : ''}.` : `No jobs named like “${name}”.`)
      : stateBlock('empty', 'No jobs yet.', 'Compare DyKAF with AdamW, SOAP, Shampoo or Muon on a small language model.',
        h('div', { style: { marginTop: '.6rem' } }, h('a', { class: 'button primary', href: '/new', text: 'Create the first job' }))));
  } else {
    fill(stateEl);
  }
  $('#load-more').classList.toggle('hidden', !state.nextCursor);
  $('#jobs-updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
  fill($('#jobs-banner'));
  document.body.dataset.loaded = '1';
}

function showError(err) {
  if (!state.loaded) {
    fill($('#jobs-body'));
    fill($('#jobs-state'), stateBlock('error', 'Could not load jobs.', errorText(err),
      h('div', { style: { marginTop: '.6rem' } }, h('button', { type: 'button', text: 'Retry now', onclick: () => poller.now() }))));
  } else {
    fill($('#jobs-banner'), banner('error', `Live updates paused: ${errorText(err)}`,
      h('button', { type: 'button', class: 'small', text: 'Retry now', onclick: () => poller.now() })));
  }
}

const poller = new Poller(load, {
  interval: () => (state.items.some((j) => ACTIVE.has(j.status)) ? FAST : SLOW),
  onStatus: (status, info) => {
    connectionStatus(status, info);
    if (status === 'offline') showError(info.error);
  },
});

function main() {
  initKeyBox();
  readFiltersFromUrl();
  let debounce = null;
  const changed = () => {
    writeFiltersToUrl();
    state.extraPages = 0;
    poller.now();
  };
  $('#status-filter').addEventListener('change', changed);
  $('#name-filter').addEventListener('input', () => {
    clearTimeout(debounce);
    debounce = setTimeout(changed, 300);
  });
  $('#load-more').addEventListener('click', () => {
    state.extraPages += 1;
    poller.now();
  });
  onKeyChange(() => {
    state.lastRender = '';
    if (state.loaded) render();
    poller.now();
  });
  poller.start();
}

main();
