// The personal-model page: ask, choose between two answers, see what was learned, delete everything.
// Served as a file (the Content-Security-Policy allows no inline script); the CSRF token comes from a data- attribute.
const CSRF = document.getElementById('personal').dataset.csrf;
const statusLine = document.getElementById('status');
let questionId = null;

function say(text, error) { statusLine.textContent = text; statusLine.className = error ? 'error' : 'muted'; }
async function reason(r) {
  try { const d = (await r.json()).detail; return typeof d === 'string' ? d : d.map(e => e.loc.slice(1).join('.') + ': ' + e.msg).join('; '); }
  catch (e) { return r.status + ' ' + r.statusText; }
}
async function call(method, url, body) {
  const options = {method, headers: {'X-CSRF-Token': CSRF, 'Accept': 'application/json'}};
  if (body !== undefined) { options.headers['Content-Type'] = 'application/json'; options.body = JSON.stringify(body); }
  const r = await fetch(url, options);
  if (r.status === 401) { window.location = '/login'; return null; }
  if (!r.ok) { say(await reason(r), true); return null; }
  return r.json();
}
function cell(row, text) { const td = document.createElement('td'); td.textContent = text; row.appendChild(td); }

async function showLearned() {
  const box = document.getElementById('learned');
  const learned = await call('GET', '/api/personal/learned');
  if (!learned) return;
  box.replaceChildren();
  const summary = document.createElement('p');
  const c = learned.counts;
  summary.textContent = 'Model answering you now: ' + learned.current_model + '. Your choices: ' + c.a + ' A, ' + c.b +
    ' B, ' + c.both_fine + ' both fine, ' + c.both_bad + ' both bad (' + learned.pairs + ' preference pairs; a new version every ' +
    learned.train_every + ' new pairs). Versions: ' + (learned.versions.map(v => 'v' + v.version + ' on ' + v.pairs + ' pairs').join(', ') || 'none yet') + '.' +
    learned.removed_versions.map(v => ' Version ' + v.version + ' was removed: it ' + v.removed + '.').join('');
  box.appendChild(summary);
  [['The last training failed: ', learned.training_error], ["The shared model's last training failed: ", learned.population_training_error]].forEach(([what, error]) => {
    if (error) { const e = document.createElement('p'); e.className = 'error'; e.textContent = what + error; box.appendChild(e); }
  });
  const table = document.createElement('table');
  const head = table.insertRow(); ['Question', 'Preferred', 'Other', 'Why'].forEach(t => { const th = document.createElement('th'); th.textContent = t; head.appendChild(th); });
  learned.choices.filter(q => q.choice === 'a' || q.choice === 'b').forEach(q => {
    const picked = q.choice === 'a' ? 0 : 1, row = table.insertRow();
    cell(row, q.prompt); cell(row, q.answers[picked].trim()); cell(row, q.answers[1 - picked].trim()); cell(row, q.reason || '');
  });
  box.appendChild(table);
}

document.getElementById('ask').addEventListener('submit', async event => {
  event.preventDefault();
  say('Writing two answers…');
  const asked = await call('POST', '/api/personal/ask', {prompt: document.getElementById('prompt').value});
  if (!asked) return;
  questionId = asked.question_id;
  ['a', 'b'].forEach((side, i) => {
    document.getElementById('answer-' + side).textContent = asked.answers[i];
    document.getElementById('model-' + side).textContent = side.toUpperCase() + ' — model: ' + asked.models[i];
  });
  document.getElementById('question').hidden = false;
  say('Which answer is better?');
});
document.querySelectorAll('[data-choice]').forEach(button => button.addEventListener('click', async () => {
  if (questionId === null) return;
  const why = document.getElementById('reason').value.trim();
  const chosen = await call('POST', '/api/personal/choose', {question_id: questionId, choice: button.dataset.choice, reason: why || null});
  if (!chosen) return;
  questionId = null; document.getElementById('question').hidden = true; document.getElementById('reason').value = '';
  say('Stored. ' + (chosen.training_queued ? 'Your model is being trained on your choices.' : ''));
  showLearned();
}));
document.getElementById('sample').addEventListener('click', async () => {
  const sample = await call('GET', '/api/personal/sample');
  if (!sample) return;
  document.getElementById('before').textContent = sample.before;
  document.getElementById('after').textContent = sample.after;
  document.getElementById('before-model').textContent = 'Before — ' + sample.models[0] + ' — "' + sample.prompt + '"';
  document.getElementById('after-model').textContent = 'After — ' + sample.models[1] + ' (the same random draws)';
  document.getElementById('before-after').hidden = false;
});
document.getElementById('delete').addEventListener('click', async () => {
  if (!window.confirm('Delete every choice you made and your personal model? This cannot be undone.')) return;
  const deleted = await call('DELETE', '/api/personal/data');
  if (deleted) { say(deleted.said); showLearned(); }
});
showLearned();
