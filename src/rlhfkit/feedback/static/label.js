// The labeler page: fetch the next item, rank it by drag-and-drop or keys, submit, skip or undo.
// Served as a file (the Content-Security-Policy allows no inline script); settings come from data- attributes.
const settings = document.getElementById('labeling').dataset;
const CSRF = settings.csrf, PROJECT = settings.project;
let item = null, started = 0, busy = false;
const list = document.getElementById('list'), statusLine = document.getElementById('status');
const undoButton = document.getElementById('undo');

function say(text, error) { statusLine.textContent = text; statusLine.className = error ? 'error' : 'muted'; }
async function reason(r) { try { return (await r.json()).detail; } catch (e) { return r.status + ' ' + r.statusText; } }
function showProgress(p) {
  document.getElementById('progress').textContent = '(' + p.done + ' done, at most ' + p.left + ' left)';
}
function showPrompt(prompt) {
  // a plain prompt keeps its line breaks; a chat prompt shows one block per turn with its role
  const box = document.getElementById('prompt');
  box.replaceChildren();
  const turns = typeof prompt === 'string' ? [{role: '', content: prompt}] : prompt;
  turns.forEach(m => {
    const turn = document.createElement('div'); turn.className = 'turn';
    if (m.role) { const role = document.createElement('span'); role.className = 'role'; role.textContent = m.role + ':'; turn.appendChild(role); }
    const text = document.createElement('span'); text.textContent = m.content; turn.appendChild(text);
    box.appendChild(turn);
  });
}
async function load() {
  const r = await fetch('/api/next?project=' + encodeURIComponent(PROJECT), {headers: {'Accept': 'application/json'}});
  if (r.status === 204) {
    item = null; document.getElementById('item').hidden = true;
    const p = await fetch('/api/progress?project=' + encodeURIComponent(PROJECT));
    if (p.ok) showProgress(await p.json());
    say('All done — thank you! Nothing is left for you in this project.'); return;
  }
  if (r.status === 503) {  // every candidate item was being given out: ask again when the server says
    const seconds = Math.min(Math.max(Number(r.headers.get('Retry-After')) || 1, 1), 30);
    item = null; document.getElementById('item').hidden = true;  // Enter must not resend the last item
    say('The server is busy; asking again in ' + seconds + ' s…'); setTimeout(load, seconds * 1000); return;
  }
  if (!r.ok) { say('Could not load the next item: ' + await reason(r), true); return; }
  item = await r.json(); started = Date.now();
  if (statusLine.textContent.startsWith('The server is busy')) say('');
  showProgress(item.progress); showPrompt(item.prompt);
  list.replaceChildren();
  item.completions.forEach(c => {
    const li = document.createElement('li');
    li.className = 'completion'; li.tabIndex = 0; li.draggable = true; li.dataset.id = c.id;
    for (const part of ['rank', 'text', 'tags']) { const span = document.createElement('span'); span.className = part; li.appendChild(span); }
    li.querySelector('.text').textContent = c.text;
    list.appendChild(li);
  });
  document.getElementById('item').hidden = false; refresh();
  list.firstChild && list.firstChild.focus();
}
function tag(kind, text) { const span = document.createElement('span'); span.className = 'tag ' + kind; span.textContent = text; return span; }
function refresh() {
  let rank = 0;
  [...list.children].forEach((li, i) => {
    if (i === 0) li.classList.remove('tied');
    if (!li.classList.contains('tied')) rank = i + 1;
    li.querySelector('.rank').textContent = '#' + rank;
    const tags = li.querySelector('.tags'); tags.replaceChildren();
    if (li.classList.contains('tied')) tags.appendChild(tag('tie', 'tied with above'));
    if (li.classList.contains('flagged')) tags.appendChild(tag('flag', 'flagged'));
  });
}
function ranking() {
  const groups = [];
  [...list.children].forEach(li => { if (li.classList.contains('tied') && groups.length) groups[groups.length - 1].push(li.dataset.id); else groups.push([li.dataset.id]); });
  return {groups, flagged: [...list.children].filter(li => li.classList.contains('flagged')).map(li => li.dataset.id)};
}
async function post(url, body) {
  return fetch(url, {method: 'POST', headers: {'Content-Type': 'application/json', 'X-CSRF-Token': CSRF}, body: JSON.stringify(body)});
}
async function submit() {
  if (!item || busy) return; busy = true;
  const body = {item_id: item.item_id, ...ranking(), seconds: (Date.now() - started) / 1000};
  const ties = body.groups.filter(g => g.length > 1).length;
  try {
    const r = await post('/api/labels', body);
    if (!r.ok) { say('Not saved: ' + await reason(r), true); return; }
    say('Saved' + (ties ? ' (with ' + ties + ' tie' + (ties > 1 ? 's' : '') + ')' : '') + '. The next item is below.');
    undoButton.hidden = false;
    await load();
  } catch (e) { say('Not saved (network error); press Enter to retry.', true); }
  finally { busy = false; }
}
async function skip() {
  if (!item || busy) return;
  const r = await post('/api/skip', {item_id: item.item_id});
  if (r.ok) { say('Skipped.'); load(); } else say('Could not skip: ' + await reason(r), true);
}
async function undo() {
  if (busy) return; busy = true;
  try {
    const r = await post('/api/undo', {project: PROJECT});
    if (!r.ok) { say('Could not undo: ' + await reason(r), true); return; }
    undoButton.hidden = true; say('Your last label was taken back: rank the item again.');
    await load();
  } finally { busy = false; }
}
let dragged = null;
list.addEventListener('dragstart', e => { dragged = e.target.closest('li'); e.dataTransfer.effectAllowed = 'move'; });
list.addEventListener('dragover', e => {
  e.preventDefault(); const over = e.target.closest('li'); if (!over || over === dragged) return;
  const after = e.clientY > over.getBoundingClientRect().top + over.offsetHeight / 2;
  list.insertBefore(dragged, after ? over.nextSibling : over); refresh();
});
list.addEventListener('drop', e => { e.preventDefault(); dragged && dragged.focus(); });
document.addEventListener('keydown', e => {
  // only keys without Ctrl/Alt/Meta (the browser's own shortcuts stay theirs), and never while a
  // control (link, button, field, the Instructions summary) has the focus: Enter there is that control's
  if (e.ctrlKey || e.altKey || e.metaKey) return;
  if (e.target.closest && e.target.closest('a, button, input, textarea, select, summary, [contenteditable]')) return;
  const li = document.activeElement && document.activeElement.closest && document.activeElement.closest('li.completion');
  const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
  // a held key repeats: only the arrows may (moving an answer far); a held Enter would submit every next
  // item unread, a held S skip them, a held T or F flip on and off
  if (e.repeat && key !== 'ArrowUp' && key !== 'ArrowDown') return;
  if (key === '?') { const d = document.getElementById('instructions'); d.open = !d.open; return; }
  if (key === 'Enter') { e.preventDefault(); submit(); return; }
  if (key === 's') { skip(); return; }
  if (key === 'u') { undo(); return; }
  if (!li) return;
  if (key === 'ArrowUp' && li.previousElementSibling) { e.preventDefault(); list.insertBefore(li, li.previousElementSibling); li.focus(); }
  else if (key === 'ArrowDown' && li.nextElementSibling) { e.preventDefault(); list.insertBefore(li.nextElementSibling, li); li.focus(); }
  else if (key === 't') { li.classList.toggle('tied'); if (li.classList.contains('tied')) say('Tied — ties should be rare.'); }
  else if (key === 'f') li.classList.toggle('flagged');
  else return;
  refresh();
});
document.getElementById('submit').addEventListener('click', submit);
document.getElementById('skip').addEventListener('click', skip);
undoButton.addEventListener('click', undo);
load();
