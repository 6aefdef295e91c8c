// REST client for /api/v1: bearer key from localStorage, one error shape, polling with backoff.

export const API = '/api/v1';
const KEY_STORAGE = 'dykaf.apiKey';

export function getKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || '';
  } catch {
    return '';
  }
}

export function setKey(key) {
  const value = (key || '').trim();
  try {
    if (value) localStorage.setItem(KEY_STORAGE, value);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: the key lives for this page only */
  }
  window.dispatchEvent(new CustomEvent('dykaf:key', { detail: { hasKey: Boolean(value) } }));
}

/** An API failure; `detail` is the API's `[{loc, msg, type}]` list (synthesised for network errors). */
export class ApiError extends Error {
  constructor(status, detail, message) {
    super(message || (detail || []).map((d) => d.msg).join('; ') || `HTTP ${status}`);
    this.status = status;
    this.detail = detail || [];
  }

  get offline() {
    return this.status === 0 || this.status === 502 || this.status === 503 || this.status === 504;
  }
}

function authHeaders() {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** `path` is relative to /api/v1 (or absolute when it starts with /api/). */
export async function request(path, { method = 'GET', body, signal, query } = {}) {
  let url = path.startsWith('/api/') ? path : API + path;
  if (query) {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) {
      if (v === undefined || v === null || v === '') continue;
      for (const item of Array.isArray(v) ? v : [v]) params.append(k, String(item));
    }
    const text = params.toString();
    if (text) url += (url.includes('?') ? '&' : '?') + text;
  }
  const headers = { Accept: 'application/json', ...authHeaders() };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal, cache: 'no-store' });
  } catch (err) {
    if (err && err.name === 'AbortError') throw err;
    throw new ApiError(0, [{ loc: [], msg: 'cannot reach the server', type: 'network' }]);
  }
  if (response.status === 204) return null;
  let payload = null;
  const type = response.headers.get('content-type') || '';
  if (type.includes('json')) {
    try {
      payload = await response.json();
    } catch {
      payload = null;
    }
  }
  if (!response.ok) {
    let detail = payload && Array.isArray(payload.detail) ? payload.detail : null;
    if (!detail) {
      const msg = payload && typeof payload.detail === 'string' ? payload.detail : `${response.status} ${response.statusText || 'error'}`;
      detail = [{ loc: [], msg, type: 'http' }];
    }
    throw new ApiError(response.status, detail);
  }
  return payload;
}

export const get = (path, query, opts = {}) => request(path, { ...opts, query });
export const post = (path, body, opts = {}) => request(path, { ...opts, method: 'POST', body });
export const del = (path, opts = {}) => request(path, { ...opts, method: 'DELETE' });

/** Human text for an error, with a hint for the usual 401. */
export function errorText(err) {
  if (!(err instanceof ApiError)) return String(err && err.message ? err.message : err);
  if (err.status === 0) return 'Cannot reach the server. Retrying…';
  if (err.status === 401) return `${err.message}. Set an API key in the top bar.`;
  return err.message;
}

/**
 * Calls `task` repeatedly. After a success the next call comes after `interval()` ms (the page
 * decides: fast while jobs run, slow when idle, 0 to stop); after a failure the delay doubles
 * from `minBackoff` up to `maxBackoff`, so a restarting server is picked up again on its own.
 * Polling pauses while the tab is hidden and resumes at once when it is shown.
 */
export class Poller {
  constructor(task, { interval = () => 2000, minBackoff = 1000, maxBackoff = 30000, onStatus = () => {} } = {}) {
    this.task = task;
    this.interval = interval;
    this.minBackoff = minBackoff;
    this.maxBackoff = maxBackoff;
    this.onStatus = onStatus;
    this.failures = 0;
    this.timer = null;
    this.running = false;
    this.stopped = true;
    this.nextAt = null;
    this.onVisible = () => {
      if (!document.hidden && !this.stopped && !this.running) this.now();
    };
  }

  start() {
    this.stopped = false;
    document.addEventListener('visibilitychange', this.onVisible);
    this.now();
    return this;
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = null;
    document.removeEventListener('visibilitychange', this.onVisible);
  }

  /** Run now (cancelling any scheduled run); concurrent calls collapse into one. */
  async now() {
    if (this.running) {
      this.again = true;
      return;
    }
    clearTimeout(this.timer);
    this.timer = null;
    this.running = true;
    let delay;
    try {
      await this.task();
      if (this.failures > 0) this.onStatus('online');
      this.failures = 0;
      delay = this.interval();
    } catch (err) {
      this.failures += 1;
      delay = Math.min(this.maxBackoff, this.minBackoff * 2 ** (this.failures - 1));
      this.onStatus('offline', { error: err, retryIn: delay, failures: this.failures });
    } finally {
      this.running = false;
    }
    if (this.stopped) return;
    if (this.again) {
      this.again = false;
      this.schedule(0);
    } else if (delay > 0) {
      this.schedule(delay);
    } // interval() of 0 or null: nothing more to poll until now() is called again
  }

  schedule(delay) {
    clearTimeout(this.timer);
    this.nextAt = Date.now() + delay;
    this.timer = setTimeout(() => {
      this.timer = null;
      if (document.hidden) return; // resumed by visibilitychange
      this.now();
    }, delay);
  }
}
