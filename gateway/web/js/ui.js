// The page's DOM: login, the list, the conversation, members, the composer. It draws the
// state app.js keeps and turns clicks into app.js calls; app.js tells it what changed
// (attach). Message text only ever reaches the DOM through textContent (never as HTML),
// and the page loads nothing but its own files (CSP in gateway/_web.py).

import {
  S, attach, conv, connect, createConversation, goOffline, goOnline, invite, loadConv, loadHistory,
  logOut, markRead, markVerified, openSession, removeMember, send, serial, short, signIn, stateOf,
  syncConversation, whoAmI,
} from "./app.js";
import { isValidId } from "./bytes.js";
import { HttpError } from "./net.js";

const $ = (id) => document.getElementById(id);

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (k.startsWith("data-")) el.setAttribute(k, v);
    else if (k === "title") el.title = v;
    else if (k === "onclick") el.addEventListener("click", v);
    else el.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    el.append(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return el;
}

const time = (s) => new Date(s * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });

// -- boot -----------------------------------------------------------------------------------

async function boot() {
  attach({ renderList, renderHeader, renderMembers, renderMessage, showConnection });
  bindUi();
  try {
    await start(await whoAmI());
  } catch (err) {
    if (err instanceof HttpError && err.status === 401) showLogin();
    else showLogin(String(err.message || err));
  }
}

function showLogin(message = "") {
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("username").focus();
}

async function login(register) {
  const username = $("username").value.trim();
  const password = $("password").value;
  $("login-error").textContent = "";
  try {
    await start(await signIn(username, password, register));
  } catch (err) {
    $("login-error").textContent = err.message || String(err);
  }
}

// Whether keys reach us post-quantum (PROTOCOL.md §2.1): with WebCrypto ML-KEM-768 the
// identity has a key and grants are hybrid; without it, X25519 only, and conversations that
// require post-quantum members (the default) cannot include this browser.
function showKem() {
  const pq = S.engine.postQuantum;
  $("me-kem").className = pq ? "kem pq" : "kem x25519";
  $("me-kem").textContent = pq
    ? "Post-quantum: keys reach you by X25519 + ML-KEM-768."
    : "X25519 only: this browser has no ML-KEM-768, so keys reach you without post-quantum " +
      "protection, and conversations that require post-quantum members cannot include you.";
  $("new-require-pq").checked = pq;
  $("new-require-pq").disabled = !pq;
}

async function start(account) {
  await openSession(account);
  $("login").hidden = true;
  $("app").hidden = false;
  $("me-name").textContent = account.username;
  $("me-pid").textContent = S.engine.pid;
  $("me-fp").textContent = await S.engine.fingerprintOf(S.engine.pid);
  showKem();
  connect();
  renderList();
}

// The bridge's state ("connecting", "offline", "unauthenticated") or "caught_up".
function showConnection(state) {
  const banner = $("banner");
  $("connection").classList.toggle("online", state === "caught_up");
  if (state === "caught_up") { banner.hidden = true; return; }
  if (state === "unauthenticated") { showLogin("Your session ended; log in again."); return; }
  banner.hidden = false;
  banner.className = state === "offline" ? "banner offline" : "banner";
  banner.textContent = state === "offline"
    ? "Offline. Messages you write are kept and sent when the connection is back."
    : "Connecting…";
}

// -- rendering -----------------------------------------------------------------------------------

function convName(c) {
  const others = c.members.filter((p) => p !== S.engine.pid);
  return others.length ? others.map(short).join(", ") : "Just you";
}

function unreadOf(c) {
  let n = 0;
  for (const m of c.messages.values()) if (!m.mine && !m.note && !m.read) n++;
  return n;
}

function renderList() {
  const list = $("conversations");
  const items = [...S.convs.values()].filter((c) => S.engine.convs.get(c.cid)?.epoch >= 0); // entered
  list.replaceChildren(...items.map((c) => {
    const n = unreadOf(c);
    return h("li", { "data-cid": c.cid, class: c.cid === S.active ? "active" : "",
                     onclick: () => serial(() => openConversation(c.cid)) },
      h("span", { class: "name" }, convName(c)),
      c.removed ? h("span", { class: "badge" }, "removed") : null,
      n ? h("span", { class: "unread", "data-unread": n }, n) : null);
  }));
}

function renderHeader() {
  if (!S.active) return;
  const c = conv(S.active);
  $("conv-title").textContent = convName(c);
  const online = c.members.filter((p) => p !== S.engine.pid && S.presence.get(p)).length;
  $("conv-sub").textContent = `${c.members.length} members, ${online} online${c.removed ? " · you were removed" : ""}`;
  $("composer").hidden = c.removed;
}

async function renderMembers() {
  if (!S.active || $("members").hidden) return;
  const cid = S.active;
  const c = conv(cid);
  const engineConv = S.engine.convs.get(cid);
  const roster = engineConv?.rosters.get(engineConv.epoch);
  const admin = roster?.members.some((m) => m.pid === S.engine.pid && m.admin) && !c.removed;
  const rows = [];
  for (const m of roster?.members ?? []) {
    const me = m.pid === S.engine.pid;
    const fp = await S.engine.fingerprintOf(m.pid);
    rows.push(h("li", { "data-pid": m.pid },
      h("div", { class: "head" },
        h("span", { class: `dot${me || S.presence.get(m.pid) ? " online" : ""}` }),
        h("code", {}, m.pid), me ? h("span", { class: "badge" }, "you") : null,
        m.admin ? h("span", { class: "badge" }, "admin") : null,
        h("span", { class: `badge${m.pq ? " pq" : ""}` }, m.pq ? "post-quantum" : "X25519 only"),
        S.engine.verified.has(m.pid) ? h("span", { class: "badge pq" }, "verified") : null),
      h("code", { class: "fp", "data-fingerprint": m.pid }, fp ?? "fingerprint unknown"),
      h("div", { class: "row" },
        !me && fp && !S.engine.verified.has(m.pid)
          ? h("button", { class: "link", type: "button", onclick: () => serial(async () => {
              await markVerified(m.pid);
              renderHeader(); renderMembers();
            }) }, "Mark verified")
          : null,
        admin && !me
          ? h("button", { class: "link", type: "button", "data-remove": m.pid, onclick: () => serial(async () => {
              try { await removeMember(cid, m.pid); } catch (err) { $("members-error").textContent = err.message; }
            }) }, "Remove")
          : null)));
  }
  if (S.active === cid) $("member-list").replaceChildren(...rows);
  $("invite").hidden = !admin;
}

function messageNode(m) {
  if (m.note) return h("li", { class: "note", "data-id": m.id }, h("span", { class: "text" }, m.text));
  const state = m.mine ? (m.state ?? "sent") : null;
  const label = { queued: "queued", sent: "✓ sent", delivered: "✓✓ delivered", read: "✓✓ read", failed: "not sent" };
  // Unsigned messages of a conversation that signs every Nth step (PROTOCOL.md §6.5).
  const trust = { pending: "… pending", verified: "✓ verified", forged: "⚠ FORGED" };
  return h("li", { class: m.mine ? "mine" : (m.trust === "forged" ? "forged" : ""), "data-id": m.id },
    m.mine ? null : h("div", { class: "sender", title: m.sender }, short(m.sender)),
    h("div", { class: "text" }, m.text),
    h("div", { class: "meta" }, time(m.sentAt),
      state ? h("span", { class: "state", "data-state": state }, ` ${label[state] ?? state}`) : null,
      m.trust ? h("span", { class: "trust", "data-trust": m.trust }, ` ${trust[m.trust]}`) : null));
}

const order = (a, b) => (a.seq ?? Infinity) - (b.seq ?? Infinity) || (a.local ?? 0) - (b.local ?? 0) || (a.id < b.id ? -1 : 1);

// Archive order (seq) is the order everyone sees; each sender's messages are kept in
// step order within the places they take in it (the broker may reorder a burst).
function arranged(c) {
  const list = [...c.messages.values()].sort(order);
  const chains = new Map();
  list.forEach((m, i) => {
    if (m.note || m.step === undefined) return;
    const key = `${m.epoch}/${m.senderIndex}/${m.chain}`;
    if (!chains.has(key)) chains.set(key, []);
    chains.get(key).push(i);
  });
  const out = list.slice();
  for (const places of chains.values()) {
    const ms = places.map((i) => list[i]).sort((a, b) => a.step - b.step);
    places.forEach((place, j) => { out[place] = ms[j]; });
  }
  return out;
}

// Drawing state: a render scheduled (one per frame at most) and whether to scroll down.
const draw = { timer: null, stickToBottom: false };

function renderMessages() {
  clearTimeout(draw.timer);
  draw.timer = null;
  if (!S.active) return;
  const c = conv(S.active);
  const scroller = $("scroller");
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
  $("messages").replaceChildren(...arranged(c).map(messageNode));
  $("older").hidden = c.historyDone;
  if (atBottom || draw.stickToBottom) scroller.scrollTop = scroller.scrollHeight;
  draw.stickToBottom = false;
}

function renderMessage(m) {
  draw.timer ??= setTimeout(renderMessages, 16);
  if (m.mine) draw.stickToBottom = true;
  if (!m.mine && !m.note && !m.read && document.visibilityState === "visible") markRead(m.cid);
}

async function openConversation(cid) {
  S.active = cid;
  $("app").classList.add("in-conversation");
  $("conversation").hidden = false;
  $("empty").hidden = true;
  $("members-error").textContent = "";
  const c = await loadConv(cid);
  if (!c.rosterSynced && S.engine.convs.get(cid)?.epoch === undefined) await syncConversation(cid);
  renderHeader();
  renderMessages();
  $("scroller").scrollTop = $("scroller").scrollHeight;
  if (!c.historyDone && c.historyBefore === null) {
    await loadHistory(cid);
    renderMessages();
    $("scroller").scrollTop = $("scroller").scrollHeight;
  }
  for (const m of c.messages.values()) if (m.mine && m.state !== "queued") m.state = stateOf(c, m);
  await markRead(cid);
  renderMembers();
  renderList();
  $("compose").focus();
}

// -- UI events ------------------------------------------------------------------------------------

function bindUi() {
  $("login-form").addEventListener("submit", (e) => { e.preventDefault(); login(false); });
  $("register-button").addEventListener("click", () => login(true));
  $("logout").addEventListener("click", async () => {
    await logOut();
    location.reload();
  });
  $("back").addEventListener("click", () => {
    S.active = null;
    $("app").classList.remove("in-conversation");
    $("conversation").hidden = true;
    $("empty").hidden = false;
    renderList();
  });
  $("members-toggle").addEventListener("click", () => {
    $("members").hidden = !$("members").hidden;
    renderMembers();
  });
  $("new-conv").addEventListener("submit", (e) => {
    e.preventDefault();
    const pids = $("new-members").value.split(/[\s,]+/).filter(Boolean);
    if (!pids.every(isValidId)) { alertIn("new-members", "Participant ids are 26 letters a-z and digits 2-7."); return; }
    serial(async () => {
      try {
        const cid = await createConversation(pids, { requirePq: $("new-require-pq").checked });
        renderList();
        await openConversation(cid);
        $("new-members").value = "";
      } catch (err) { alertIn("new-members", err.message); }
    });
  });
  $("invite").addEventListener("submit", (e) => {
    e.preventDefault();
    const pid = $("invite-pid").value.trim();
    const cid = S.active;
    if (!isValidId(pid)) { $("members-error").textContent = "Not a participant id."; return; }
    serial(async () => {
      try { await invite(cid, pid); $("invite-pid").value = ""; } catch (err) { $("members-error").textContent = err.message; }
    });
  });
  const submit = () => {
    const text = $("compose").value;
    if (!text.trim() || !S.active) return;
    $("compose").value = "";
    const cid = S.active;
    send(cid, text).catch((err) => { $("compose").value = text; alertIn("compose", err.message); });
  };
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  $("compose").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
  });
  $("older").addEventListener("click", () => serial(async () => {
    if (!S.active) return;
    const scroller = $("scroller");
    const from = scroller.scrollHeight - scroller.scrollTop;
    await loadHistory(S.active);
    renderMessages();
    scroller.scrollTop = scroller.scrollHeight - from;
  }));
  $("scroller").addEventListener("scroll", () => {
    if ($("scroller").scrollTop === 0 && S.active && !conv(S.active).historyDone) $("older").click();
  });
  window.addEventListener("offline", goOffline);
  window.addEventListener("online", goOnline);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && S.active) markRead(S.active);
  });
}

function alertIn(id, message) {
  const el = $(id);
  el.setCustomValidity(message);
  el.reportValidity();
  setTimeout(() => el.setCustomValidity(""), 3000);
}

boot();
