// Tiny DOM helpers. Every piece of data reaches the page as a text node or an attribute value,
// never as parsed HTML markup (no HTML-string sinks anywhere in the dashboard).

/**
 * Create an element. `props`: class, text, dataset (object), on<event> (listener), attributes.
 * Children: nodes, strings/numbers (become text nodes), arrays, null/false (skipped).
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'text') el.textContent = String(value);
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key === 'style' && typeof value === 'object') Object.assign(el.style, value);
    else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
    else if (key === 'value' && 'value' in el) el.value = value;
    else if (key === 'checked' || key === 'disabled' || key === 'selected') el[key] = Boolean(value);
    else if (value === true) el.setAttribute(key, '');
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

export function $$(selector, root = document) {
  return Array.from(root.querySelectorAll(selector));
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** An empty / loading / error state block. */
export function stateBlock(kind, title, detail, action) {
  return h('div', { class: `state ${kind}`, role: kind === 'error' ? 'alert' : null, dataset: { state: kind } },
    kind === 'loading' ? [h('span', { class: 'spinner' }), ' '] : null,
    h('div', { class: 'title', text: title }),
    detail ? h('div', { text: detail }) : null,
    action || null);
}

export function banner(kind, message, action) {
  return h('div', { class: `banner ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, message, action ? [' ', action] : null);
}
