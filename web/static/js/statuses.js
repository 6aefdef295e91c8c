// Generated from RunStatus (server/jobs/status.py): python -m server.jobs.status; do not edit.
export const STATUSES = ['queued', 'running', 'succeeded', 'failed', 'diverged', 'cancelled'];
export const ACTIVE = new Set(['queued', 'running']);
export const TERMINAL = new Set(['succeeded', 'failed', 'diverged', 'cancelled']);
