"""The web page at /: one HTML document with plain JavaScript over the JSON API (no build step)."""

PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>crossalign search</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0; color: #1d2433; background: #f6f7f9; }
  header { background: #1d2433; color: #fff; padding: 12px 20px; display: flex; gap: 16px; align-items: center; }
  header h1 { font-size: 18px; margin: 0; }
  #status { font-size: 12px; opacity: .8; }
  main { padding: 16px 20px; }
  form { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; }
  #q { flex: 1 1 360px; font-size: 16px; padding: 8px; }
  select, button { padding: 7px; font-size: 14px; }
  #drop { margin: 12px 0; padding: 14px; border: 2px dashed #9aa3b5; border-radius: 8px; text-align: center;
          background: #fff; }
  #drop.over { border-color: #2f6fed; background: #eef3ff; }
  #error { display: none; margin: 10px 0; padding: 10px; background: #fde8e8; color: #9b1c1c; border-radius: 6px; }
  #grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 12px; }
  .card { background: #fff; border-radius: 8px; padding: 8px; box-shadow: 0 1px 3px rgba(0,0,0,.12); }
  .card img { width: 100%; height: 180px; object-fit: contain; background: #eee; border-radius: 4px; }
  .score { font-weight: 600; font-size: 13px; } .cos { color: #667; font-weight: 400; }
  .captions { font-size: 12px; color: #445; margin: 4px 0; padding-left: 16px; }
  .label { display: inline-block; font-size: 11px; background: #e3ecff; color: #1f4fb8; border-radius: 10px;
           padding: 1px 8px; }
  .caprow { display: flex; gap: 10px; align-items: center; background: #fff; margin: 6px 0; padding: 6px;
            border-radius: 6px; }
  .caprow img { width: 64px; height: 64px; object-fit: contain; background: #eee; }
  #more { margin: 14px 0; display: none; }
  h2 { font-size: 16px; margin: 16px 0 8px; }
</style>
</head>
<body>
<header><h1>crossalign</h1><span id="status">loading…</span></header>
<main>
<form id="search">
  <input id="q" name="q" type="search" placeholder="Describe an image, e.g. a dog runs on the beach" autofocus>
  <select id="target" title="search in"><option value="images">images</option>
    <option value="captions">captions</option></select>
  <select id="mode" title="caption search mode"><option value="vector">vector</option>
    <option value="fts">full text</option><option value="hybrid">hybrid</option></select>
  <select id="split" title="split"><option value="">all splits</option></select>
  <select id="corpus" title="corpus"><option value="">all corpora</option></select>
  <select id="label" title="zero-shot label"><option value="">all labels</option></select>
  <select id="mapper" title="mapper"></select>
  <button type="submit">Search</button>
</form>
<div id="drop">Drop an image here, or <label><u>choose a file</u>
  <input id="upload" type="file" accept="image/*" hidden></label>, to find similar images and matching captions.</div>
<div id="error" role="alert"></div>
<h2 id="title"></h2>
<div id="grid"></div>
<h2 id="captions-title"></h2>
<div id="caption-list"></div>
<button id="more" type="button">More results</button>
</main>
<script>
const $ = (id) => document.getElementById(id);
let last = null;  // {url, offset} of the last listing, for "more results"

function showError(message) {
  const e = $('error'); e.textContent = message; e.style.display = message ? 'block' : 'none';
}
function esc(s) {
  const d = document.createElement('div'); d.textContent = s == null ? '' : String(s); return d.innerHTML;
}
function filters() {
  const p = new URLSearchParams();
  for (const k of ['split', 'corpus', 'label', 'mapper']) if ($(k).value) p.set(k, $(k).value);
  return p;
}
async function call(url, options) {
  const r = await fetch(url, options);
  let body = null;
  try { body = await r.json(); } catch (e) { body = {error: `HTTP ${r.status}`}; }
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}
function card(hit) {
  const caps = (hit.captions || []).map(c => `<li>${esc(c)}</li>`).join('');
  const cos = hit.cosine != null ? ` <span class="cos">cos ${hit.cosine.toFixed(3)}</span>` : '';
  const label = hit.label ? `<span class="label" title="zero-shot label">${esc(hit.label)}</span>` : '';
  return `<div class="card" data-id="${esc(hit.id)}"><a href="${esc(hit.image)}" target="_blank">
    <img class="thumb" src="${esc(hit.thumbnail)}?size=256" alt="${esc(hit.id)}" loading="lazy"></a>
    <div class="score">#${hit.rank} · ${hit.score.toFixed(3)}${cos}</div> ${label}
    <ul class="captions">${caps}</ul>
    <a class="more" href="#similar=${encodeURIComponent(hit.id)}">more like this</a></div>`;
}
function caprow(hit) {
  const cos = hit.cosine != null ? ` <span class="cos">cos ${hit.cosine.toFixed(3)}</span>` : '';
  return `<div class="caprow"><img src="${esc(hit.thumbnail)}?size=96" alt="${esc(hit.image_id)}" loading="lazy">
    <div><div class="score">#${hit.rank} · ${hit.score.toFixed(3)}${cos}</div>${esc(hit.text)}
    <div><a class="more" href="#similar=${encodeURIComponent(hit.image_id)}">more like this</a></div></div></div>`;
}
function render(hits, append, kind) {
  const html = hits.map(kind === 'captions' ? caprow : card).join('');
  const box = kind === 'captions' ? $('caption-list') : $('grid');
  box.innerHTML = append ? box.innerHTML + html : html;
}
async function list(url, title, kind, append) {
  showError('');
  const offset = append ? last.offset : 0;
  const body = await call(`${url}&offset=${offset}`);
  if (!append) { $('title').textContent = ''; $('captions-title').textContent = ''; $('grid').innerHTML = '';
                 $('caption-list').innerHTML = ''; }
  (kind === 'captions' ? $('captions-title') : $('title')).textContent =
      body.hits.length || append ? title : `${title}: nothing found`;
  render(body.hits, append, kind);
  last = {url, title, kind, offset: offset + body.hits.length};
  $('more').style.display = body.hits.length ? 'inline-block' : 'none';
}
async function searchText() {
  const q = $('q').value, p = filters();
  if (!q.trim()) { showError('Type a query first.'); return; }
  const target = $('target').value;
  p.set('q', q); p.set('target', target); p.set('mode', target === 'captions' ? $('mode').value : 'vector');
  p.set('captions', 'true'); p.set('limit', '24');
  await list(`/api/search/text?${p}`, `${target === 'images' ? 'Images' : 'Captions'} for “${q}”`, target, false);
}
async function similar(id) {
  const p = filters(); p.set('captions', 'true'); p.set('limit', '24');
  await list(`/api/images/${encodeURIComponent(id)}/similar?${p}`, 'More like this', 'images', false);
}
async function upload(file) {
  showError('');
  if (!file) return;
  const p = filters(); p.set('limit', '24');
  const post = (target, extra) => call(`/api/search/image?${p}&target=${target}${extra}`,
      {method: 'POST', headers: {'Content-Type': file.type || 'application/octet-stream'}, body: file});
  try {
    const images = await post('images', '&captions=true');
    const captions = await post('captions', '');
    $('title').textContent = `Similar images to ${file.name}`; render(images.hits, false, 'images');
    $('captions-title').textContent = `Captions matching ${file.name}`; render(captions.hits, false, 'captions');
    $('more').style.display = 'none'; last = null;
  } catch (err) { showError(`${file.name}: ${err.message}`); }
}
async function route() {
  const h = new URLSearchParams(location.hash.slice(1));
  try {
    if (h.get('similar')) await similar(h.get('similar'));
    else if (h.get('q')) { $('q').value = h.get('q'); await searchText(); }
  } catch (err) { showError(err.message); }
}
async function init() {
  try {
    const t = await call('/api/tables');
    $('status').textContent = `mapper ${t.current_mapper} · ${t.tables.images.rows} images · ` +
        `${t.tables.captions.rows} captions` + (t.notice ? ` · ${t.notice}` : '');
    for (const s of t.splits) $('split').add(new Option(s, s));
    for (const c of t.corpora) $('corpus').add(new Option(c, c));
    for (const [l, n] of Object.entries(t.labels.counts || {})) $('label').add(new Option(`${l} (${n})`, l));
    const mappers = [...new Set(t.mappers.map(m => m.mapper_id))];
    for (const m of mappers) $('mapper').add(new Option(m === t.current_mapper ? `${m} (current)` : m,
                                                         m === t.current_mapper ? '' : m));
  } catch (err) { showError(err.message); }
  route();
}
$('search').addEventListener('submit', (e) => {
  e.preventDefault();
  const q = $('q').value;
  if (location.hash === `#q=${encodeURIComponent(q)}`) route(); else location.hash = `q=${encodeURIComponent(q)}`;
});
window.addEventListener('hashchange', route);
$('more').addEventListener('click',
    () => last && list(last.url, last.title, last.kind, true).catch(e => showError(e.message)));
$('upload').addEventListener('change', (e) => upload(e.target.files[0]));
const drop = $('drop');
drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (e) => {
  e.preventDefault(); drop.classList.remove('over'); upload(e.dataTransfer.files[0]);
});
init();
</script>
</body>
</html>
"""
