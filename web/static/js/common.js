// Pieces shared by the pages: the API-key box, confirmation dialog, toasts, connection status,
// status badges, progress bars and the cancel / rerun / delete actions.

import { del, errorText, getKey, post, setKey } from './api.js';
import { $, h } from './dom.js';
import { percent } from './format.js';
import { ACTIVE, TERMINAL } from './statuses.js';

export { ACTIVE, TERMINAL };

export function initKeyBox() {
  const form = $('#key-form');
  const input = $('#api-key');
  const stateEl = $('#key-state');
  if (!form) return;
  const show = () => {
    const has = Boolean(getKey());
    input.value = '';
    input.placeholder = has ? 'saved ✓ (paste to replace)' : 'dykaf_…';
    stateEl.textContent = '';
    form.dataset.hasKey = has ? '1' : '0';
  };
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    if (!input.value.trim()) return;
    setKey(input.value);
    show();
    toast('API key saved in this browser');
  });
  $('#key-clear').addEventListener('click', () => {
    setKey('');
    show();
    toast('API key removed');
  });
  show();
}

export function onKeyChange(callback) {
  window.addEventListener('dykaf:key', callback);
  window.addEventListener('storage', (event) => {
    if (event.key === 'dykaf.apiKey') callback();
  });
}

let toastTimer = null;
export function toast(message, kind = 'info') {
  const el = $('#toast');
  if (!el) return;
  el.textContent = message;
  el.className = `toast ${kind === 'error' ? 'error' : ''}`;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => el.classList.add('hidden'), kind === 'error' ? 8000 : 3500);
}

/** Modal confirmation; resolves true when confirmed. */
export function confirmDialog(text, confirmLabel = 'Confirm', danger = false) {
  const dialog = $('#confirm-dialog');
  $('#confirm-text').textContent = text;
  const yes = $('#confirm-yes');
  yes.textContent = confirmLabel;
  yes.className = danger ? 'danger' : 'primary';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    dialog.returnValue = '';
    dialog.showModal();
    $('#confirm-no').focus();
  });
}

/** Connection indicator in the top bar (driven by pollers). */
export function connectionStatus(state, info = {}) {
  const el = $('#conn-status');
  if (!el) return;
  if (state === 'offline') {
    const secs = Math.round((info.retryIn || 0) / 1000);
    el.className = 'conn offline';
    el.textContent = info.error && info.error.status === 0
      ? `● server unreachable — retrying in ${secs} s`
      : `● ${errorText(info.error)} — retrying in ${secs} s`;
    document.body.dataset.conn = 'offline';
  } else {
    el.className = 'conn online';
    el.textContent = '● live';
    document.body.dataset.conn = 'online';
    setTimeout(() => {
      if (el.textContent === '● live') el.textContent = '';
    }, 3000);
  }
}

export function statusBadge(status) {
  return h('span', { class: `badge status-${status}`, dataset: { status }, text: status });
}

/** Progress bar with "42% · 120/300 steps · 2 running, 1 queued". */
export function progressBar(progress, status) {
  const fraction = Math.max(0, Math.min(1, (progress && progress.fraction) || 0));
  const bar = h('div', {
    class: `progress ${status === 'succeeded' ? 'done' : ''} ${status === 'failed' || status === 'diverged' ? 'bad' : ''}`,
    role: 'progressbar',
    'aria-valuemin': 0,
    'aria-valuemax': 100,
    'aria-valuenow': Math.round(fraction * 100),
  }, h('span', { style: { width: `${(fraction * 100).toFixed(1)}%` } }));
  const runs = (progress && progress.runs) || {};
  const parts = Object.entries(runs).filter(([, n]) => n > 0).map(([s, n]) => `${n} ${s}`);
  const done = (progress && progress.steps_done) || 0;
  const total = (progress && progress.steps_total) || 0;
  // Steps actually trained: a job that ended early says how far it got.
  const stopped = TERMINAL.has(status) && done < total ? 'stopped at ' : '';
  const text = h('div', { class: 'progress-text' },
    `${stopped}${percent(fraction)} · ${done}/${total} steps`,
    parts.length ? ` · ${parts.join(', ')}` : '');
  return h('div', { class: 'progress-cell' }, bar, text);
}

/**
 * Buttons for the write actions on a job (shown only with an API key). `after(kind, result)` is
 * called once an action succeeded.
 */
export function jobActionButtons(job, after, { compact = false } = {}) {
  if (!getKey()) return [];
  const buttons = [];
  const cls = compact ? 'small' : '';
  const name = job.name;
  const act = async (button, kind, question, label, danger, call) => {
    if (!(await confirmDialog(question, label, danger))) return;
    button.disabled = true;
    try {
      const result = await call();
      toast(`${label}: job ${job.id} — done`);
      after(kind, result);
    } catch (err) {
      toast(`${label} failed: ${errorText(err)}`, 'error');
    } finally {
      button.disabled = false;
    }
  };
  if (ACTIVE.has(job.status) && !job.cancel_requested) {
    const b = h('button', { class: `${cls} danger`, type: 'button', dataset: { action: 'cancel' }, text: 'Cancel' });
    b.addEventListener('click', () => act(b, 'cancel', `Cancel job ${job.id} “${name}”? Runs stop at their next step; data so far is kept.`, 'Cancel job', true,
      () => post(`/jobs/${job.id}/cancel`)));
    buttons.push(b);
  }
  const r = h('button', { class: cls, type: 'button', dataset: { action: 'rerun' }, text: 'Rerun' });
  r.addEventListener('click', () => act(r, 'rerun', `Submit a new job with the same spec as job ${job.id} “${name}”?`, 'Rerun', false,
    () => post(`/jobs/${job.id}/rerun`)));
  buttons.push(r);
  if (TERMINAL.has(job.status)) {
    const d = h('button', { class: `${cls} danger`, type: 'button', dataset: { action: 'delete' }, text: 'Delete' });
    d.addEventListener('click', () => act(d, 'delete', `Delete job ${job.id} “${name}” and all its metrics? This cannot be undone.`, 'Delete', true,
      () => del(`/jobs/${job.id}`)));
    buttons.push(d);
  }
  return buttons;
}
