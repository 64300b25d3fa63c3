"""The one HTML page of the reader app: sign-in form and reading view, with inline CSS and vanilla JS.

Nothing is loaded from elsewhere (no CDN, no fonts), so the page works on an offline machine. Keys:
left arrow or 1 = left, right arrow or 2 = right, space or 0 = can't tell, p = previous pair; they are
ignored while the reason box has focus (Escape leaves it).
"""

from __future__ import annotations

import html

_CSS = """
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; background: #f4f4f5;
       color: #1d1d1f; }
header { display: flex; gap: 1.5em; align-items: center; padding: .6em 1.2em; background: #23272f; color: #fff; }
header .grow { flex: 1; }
header button { background: transparent; color: #ddd; border: 1px solid #666; }
main { max-width: 1100px; margin: 1em auto; padding: 0 1em; }
h1 { font-size: 1.25em; margin: .4em 0; }
#question { font-size: 1.1em; }
.pair { display: flex; gap: 1.5em; justify-content: center; }
figure { margin: 0; background: #fff; padding: .6em; border: 3px solid transparent; border-radius: 6px; }
figure.chosen { border-color: #2f7de1; }
figure img { display: block; width: min(44vw, 60vh, 512px); height: min(44vw, 60vh, 512px); object-fit: contain;
             background: #000; }
figcaption { text-align: center; margin-top: .4em; color: #444; }
.rating button { min-width: 2.2em; }
.rating button.on { background: #2f7de1; color: #fff; }
button { font-size: 1em; padding: .45em .9em; border-radius: 5px; border: 1px solid #999; background: #fff;
         cursor: pointer; }
button.chosen { outline: 3px solid #2f7de1; }
.choices { display: flex; gap: 1em; justify-content: center; margin: 1em 0; }
.choices button { font-size: 1.1em; padding: .7em 1.3em; }
textarea { width: 100%; height: 3.5em; font: inherit; }
.nav { display: flex; gap: 1em; justify-content: space-between; }
.note { color: #555; }
.error { color: #b00020; }
kbd { border: 1px solid #aaa; border-radius: 3px; padding: 0 .3em; background: #fafafa; font-size: .85em; }
"""

_JS = """
const $ = (id) => document.getElementById(id);
const state = { item: null, total: 0, done: 0, ratings: { left: null, right: null }, busy: false };

async function api(method, path, body) {
  const opts = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  return { status: r.status, data };
}

function showSignin(message) {
  $("study").hidden = true; $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  $("token").focus();
}

function setRating(side, value) {
  state.ratings[side] = state.ratings[side] === value ? null : value;
  for (const b of document.querySelectorAll(`#rating-${side} button`)) {
    b.classList.toggle("on", Number(b.dataset.value) === state.ratings[side]);
  }
}

function render(data) {
  $("signin").hidden = true; $("study").hidden = false;
  state.total = data.total; state.done = data.done; state.item = data.item;
  $("reader").textContent = data.reader;
  $("progress").textContent = `${data.done} / ${data.total}`;
  const it = data.item;
  $("reading").hidden = !it; $("finished").hidden = !!it;
  $("previous").disabled = it ? it.position <= 1 : data.total === 0;
  if (!it) { $("message").textContent = ""; return; }
  $("position").textContent = `pair ${it.position} of ${data.total}`;
  $("label").textContent = it.label.replaceAll("_", " ");
  $("img-left").src = it.left; $("img-right").src = it.right;
  state.ratings = { left: null, right: null };
  const a = it.answer;
  setRating("left", a ? a.rating_left : null); setRating("right", a ? a.rating_right : null);
  $("reason").value = a ? a.reason : "";
  for (const c of ["left", "right", "tie"]) { $(`choose-${c}`).classList.toggle("chosen", !!a && a.choice === c); }
  $("fig-left").classList.toggle("chosen", !!a && a.choice === "left");
  $("fig-right").classList.toggle("chosen", !!a && a.choice === "right");
  $("current").hidden = !a;
  $("message").textContent = a ? "You answered this pair before; choosing again changes your answer." : "";
}

async function load(path) {
  if (state.busy) return;
  state.busy = true;
  try {
    const r = await api("GET", path);
    if (r.status === 401) return showSignin();
    if (r.status !== 200) { $("message").textContent = (r.data && r.data.detail) || `error ${r.status}`; return; }
    render(r.data);
  } finally { state.busy = false; if (document.activeElement !== $("reason")) document.activeElement.blur(); }
}

async function choose(choice) {
  const it = state.item;
  if (!it || state.busy) return;
  state.busy = true;
  let r;
  try {
    r = await api("POST", "/api/answers", { pair: it.pair, choice, rating_left: state.ratings.left,
      rating_right: state.ratings.right, reason: $("reason").value, change: it.answer !== null });
  } finally { state.busy = false; }
  if (r.status === 401) return showSignin();
  if (r.status === 201 || r.status === 409) return load("/api/next");  // 409: answered in another tab
  $("message").textContent = (r.data && JSON.stringify(r.data.detail)) || `error ${r.status}`;
}

function previous() {
  const pos = state.item ? state.item.position - 1 : state.total;
  if (pos >= 1) load(`/api/item/${pos}`);
}

$("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const r = await api("POST", "/api/signin", { token: $("token").value.trim() });
  if (r.status !== 200) return showSignin("Unknown token. Check the token you were given.");
  $("token").value = "";
  load("/api/next");
});
$("signout").addEventListener("click", async () => { await api("POST", "/api/signout"); showSignin(); });
for (const c of ["left", "right", "tie"]) $(`choose-${c}`).addEventListener("click", () => choose(c));
for (const side of ["left", "right"]) {
  for (let v = 1; v <= 5; v++) {
    const b = document.createElement("button");
    b.type = "button"; b.textContent = v; b.dataset.value = v; b.title = `plausibility ${v} of 5`;
    b.addEventListener("click", () => setRating(side, v));
    $(`rating-${side}`).appendChild(b);
  }
}
$("previous").addEventListener("click", previous);
$("current").addEventListener("click", () => load("/api/next"));
document.addEventListener("keydown", (ev) => {
  if (ev.target === $("reason")) { if (ev.key === "Escape") $("reason").blur(); return; }
  if (ev.target.tagName === "INPUT" || $("study").hidden || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const keys = { ArrowLeft: "left", "1": "left", ArrowRight: "right", "2": "right", " ": "tie", "0": "tie" };
  if (keys[ev.key]) { ev.preventDefault(); choose(keys[ev.key]); }
  else if (ev.key === "p") { ev.preventDefault(); previous(); }
});
if (!$("signin").dataset.error) load("/api/next"); else showSignin($("signin").dataset.error);
"""

_BODY = """
<div id="signin" hidden data-error="{error}">
  <main>
    <h1>{title}: reader sign-in</h1>
    <form id="signin-form">
      <label for="token">Reader token</label>
      <input id="token" type="password" autocomplete="off" size="40">
      <button type="submit">Sign in</button>
    </form>
    <p id="signin-error" class="error"></p>
  </main>
</div>
<div id="study" hidden>
  <header><strong>{title}</strong><span>reader: <span id="reader"></span></span>
    <span>answered: <span id="progress">0 / 0</span></span><span class="grow"></span>
    <button id="signout" type="button">Sign out</button></header>
  <main>
    <div id="reading" hidden>
      <h1 id="question">Which image is the more clinically plausible <em id="label"></em>?</h1>
      <p class="note"><span id="position"></span>. Rating each image (1 = implausible, 5 = fully plausible)
        and a reason are optional.</p>
      <div class="pair">
        <figure id="fig-left"><img id="img-left" alt="left image">
          <figcaption>Left <span class="rating" id="rating-left"></span></figcaption></figure>
        <figure id="fig-right"><img id="img-right" alt="right image">
          <figcaption>Right <span class="rating" id="rating-right"></span></figcaption></figure>
      </div>
      <div class="choices">
        <button id="choose-left" type="button">Left <kbd>&larr;</kbd> <kbd>1</kbd></button>
        <button id="choose-tie" type="button">Can't tell <kbd>space</kbd> <kbd>0</kbd></button>
        <button id="choose-right" type="button">Right <kbd>&rarr;</kbd> <kbd>2</kbd></button>
      </div>
      <textarea id="reason" maxlength="2000" placeholder="Reason (optional)"></textarea>
      <p id="message" class="note"></p>
    </div>
    <div id="finished" hidden><h1>All pairs answered. Thank you.</h1>
      <p class="note">Every answer is saved. Use Previous to review or change one.</p></div>
    <div class="nav"><button id="previous" type="button">&lsaquo; Previous <kbd>p</kbd></button>
      <button id="current" type="button" hidden>Next unanswered &rsaquo;</button></div>
  </main>
</div>
"""


def reading_page(title: str, error: str = "") -> str:
    """The whole page as one HTML string; ``error`` opens it on the sign-in form with that message."""
    esc = html.escape
    body = _BODY.replace("{title}", esc(title)).replace("{error}", esc(error, quote=True))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}: reader study</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
            f"<script>{_JS}</script>\n</body>\n</html>\n")
