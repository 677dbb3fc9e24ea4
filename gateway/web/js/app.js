// The page's session and protocol: its state, the /ws frames, rosters, envelopes opened
// and held, receipts, the outbox, history pages. No DOM: ui.js draws the state and is
// told what changed through the view it attaches (as engine.js knows no network).

import { FieldchatError, fromB64, isValidId, utf8 } from "./bytes.js";
import { Engine } from "./engine.js";
import { Bridge, api, claimParticipant } from "./net.js";
import { openStore } from "./store.js";
import { MSG, readHeader } from "./wire.js";

const PAGE = 100; // envelopes per history page
const KEY_WAIT_TRIES = 100; // 10 s for an epoch's secret before a send gives up
const MAX_HELD = 2000; // envelopes waiting for their grant, roster or reach, per conversation
// Refusals worth holding an envelope for (PROTOCOL.md §6.4): its key, roster or chain end
// may come; `unsigned_jump` ones wait until the chain's reach passes them.
const HOLD = new Set(["missing_key", "chain_end_unknown", "unsigned_jump", "unknown_conversation"]);
const ROSTER_FETCH_AGAIN_MS = 5000; // per conversation, as a device's ROSTER_FETCH_AGAIN_S
const RECEIPT_MS = 500;
const RETRY_MS = 1000;
const MAX_ATTEMPTS = 30; // publishes refused for a transient reason are retried this often

const short = (pid) => pid.slice(0, 8);

// What the page draws when the state changes; ui.js attaches it at boot.
const view = {
  renderList() {}, renderHeader() {}, renderMembers() {}, renderMessage() {},
  showConnection() {}, // the bridge's state, or "caught_up"
};

function attach(drawing) { Object.assign(view, drawing); }

// -- state ----------------------------------------------------------------------------------

const S = {
  account: null, store: null, engine: null, bridge: null,
  cursor: null, grantCursor: 0,
  convs: new Map(), // cid -> {cid, members, removed, unread, messages: Map id->msg, loaded, historyBefore, historyDone}
  active: null,
  presence: new Map(),
  held: new Map(), // cid -> [{seq, data, far, epoch, sender, chain, step}]
  rosterFetched: new Map(), // cid -> when its rosters were last fetched (ms)
  rosterTimers: new Map(), // cid -> a fetch scheduled for when the last one is old enough
  receipts: new Map(), // `${cid}|${type}` -> Set of "epoch/sender/chain/step"
  caughtUp: false,
  queue: Promise.resolve(),
  sending: Promise.resolve(),
  flushing: false,
  online: navigator.onLine,
};

// Frames and history pages are handled one at a time, in order.
function serial(fn) {
  const run = S.queue.then(fn, fn);
  S.queue = run.catch((err) => console.warn("fieldchat:", err));
  return run;
}

function conv(cid) {
  let c = S.convs.get(cid);
  if (!c) {
    c = { cid, members: [], removed: false, messages: new Map(), loaded: false, historyBefore: null,
          historyDone: false, rosterSynced: false };
    S.convs.set(cid, c);
  }
  return c;
}

// -- session --------------------------------------------------------------------------------

const whoAmI = () => api("GET", "/v1/me");

async function signIn(username, password, register) {
  if (register) await api("POST", "/v1/accounts", { username, password });
  return api("POST", "/v1/session", { username, password });
}

// The account's engine and what the page kept of its state (IndexedDB).
async function openSession(account) {
  S.account = account;
  S.store = await openStore(account.username);
  S.engine = await Engine.open(S.store);
  await publishAll(await S.engine.maintainPrekeys());
  if (!account.pids.includes(S.engine.pid)) {
    // A new browser for this account (register the participant it just made), or one
    // whose claim predates proofs (account.unverified): prove we hold its key.
    await claimParticipant(S.engine.identity);
  }
  S.cursor = (await S.store.get("ui/cursor")) ?? null;
  S.grantCursor = (await S.store.get("ui/grantCursor")) ?? 0;
  for (const [, c] of await S.store.entries("ui/conv/")) Object.assign(conv(c.cid), c);
  for (const [key, list] of (await S.store.get("ui/receipts")) ?? []) S.receipts.set(key, new Set(list));
  for (const [key, list] of await S.store.entries("ui/held/")) S.held.set(key.slice(8), list);
}

// The /ws bridge, from the stored cursors, and receipts sent every RECEIPT_MS.
function connect() {
  S.bridge = new Bridge({
    onFrame: (f) => serial(() => onFrame(f)),
    onState: onConnection,
    cursors: () => ({ cursor: S.cursor, grantCursor: S.grantCursor }),
  });
  if (S.online) S.bridge.start();
  else onConnection("offline");
  setInterval(() => serial(flushReceipts), RECEIPT_MS);
}

async function logOut() {
  await publishStatus("offline");
  S.bridge?.stop();
  await api("DELETE", "/v1/session").catch(() => {});
}

function goOffline() { S.online = false; S.bridge?.stop(); onConnection("offline"); }

function goOnline() { S.online = true; S.bridge?.start(); }

function onConnection(state) {
  S.caughtUp = false;
  if (state === "unauthenticated") S.bridge.stop();
  view.showConnection(state);
}

function caughtUp() {
  S.caughtUp = true;
  view.showConnection("caught_up");
  publishStatus("online");
  flushOutbox();
}

// -- frames ---------------------------------------------------------------------------------

async function onFrame(f) {
  switch (f.op) {
    case "hello":
      if (S.cursor === null) { S.cursor = f.cursor; await S.store.put("ui/cursor", S.cursor); }
      // The gateway's list of our conversations: only what the engine adopts counts.
      for (const cid of Object.keys(f.conversations ?? {})) if (isValidId(cid)) await syncConversation(cid);
      await payOwed();
      view.renderList();
      break;
    case "envelope":
      await onEnvelope(f.cid, f.seq, fromB64(f.data), true);
      if (f.seq > (S.cursor ?? 0)) { S.cursor = f.seq; await S.store.put("ui/cursor", S.cursor); }
      break;
    case "grant":
      await onInbox(f.cid, fromB64(f.data));
      if (f.seq > S.grantCursor) { S.grantCursor = f.seq; await S.store.put("ui/grantCursor", f.seq); }
      break;
    case "roster":
      await takeRoster(f.cid, fromB64(f.data), true);
      break;
    case "presence": {
      let text = "";
      try { text = new TextDecoder().decode(fromB64(f.status)); } catch { /* not ours to judge */ }
      S.presence.set(f.pid, text === "online");
      view.renderHeader();
      view.renderMembers();
      break;
    }
    case "caught_up":
      caughtUp();
      break;
    default:
      break;
  }
}

// The rosters of a conversation from the gateway, oldest epoch first. The gateway is
// trusted for none of them: the engine adopts a roster only as the next link of the chain
// it verified from epoch 0, holds what does not chain yet and refuses the rest (§5.2).
async function syncConversation(cid) {
  S.rosterFetched.set(cid, Date.now());
  let rosters;
  try {
    rosters = await api("GET", `/v1/conversations/${cid}/rosters`);
  } catch {
    return;
  }
  const tip = S.engine.convs.get(cid)?.tip ?? -1;
  const publications = [];
  for (const r of Array.isArray(rosters) ? rosters : []) {
    if (!(r?.epoch > tip)) continue; // adopted already: another one would be refused
    try {
      publications.push(...await S.engine.handleRoster(fromB64(r.roster)));
    } catch (err) {
      if (!(err instanceof FieldchatError)) throw err;
    }
  }
  await afterRosters(cid, publications, false);
}

// A roster held for the epochs before it: fetch them, at most every ROSTER_FETCH_AGAIN_MS
// per conversation (then once more when that time has passed, if it still waits).
async function wantRosters(cid) {
  const wait = (S.rosterFetched.get(cid) ?? -Infinity) + ROSTER_FETCH_AGAIN_MS - Date.now();
  if (wait <= 0) return syncConversation(cid);
  if (S.rosterTimers.has(cid)) return;
  S.rosterTimers.set(cid, setTimeout(() => serial(async () => {
    S.rosterTimers.delete(cid);
    if (S.engine.convs.get(cid)?.candidates.size) await wantRosters(cid);
  }), wait));
}

// A roster from the live feed or our inbox (an inviting admin sends the earlier ones).
async function takeRoster(cid, data, live) {
  let publications;
  try {
    publications = await S.engine.handleRoster(data);
  } catch (err) {
    if (!(err instanceof FieldchatError)) throw err;
    if (err.reason === "roster_pending") await wantRosters(err.cid);
    return;
  }
  await afterRosters(cid, publications, live);
}

// After rosters were taken: the members as the engine's current roster says, our grants
// (and any owed to members whose bundles just came), and what waited for them.
async function afterRosters(cid, publications, live) {
  const engineConv = S.engine.convs.get(cid);
  if (!isValidId(cid) || !engineConv || engineConv.epoch < 0) return;
  const c = conv(cid);
  const wasRemoved = c.removed;
  c.removed = engineConv.removed;
  c.rosterSynced = true;
  const before = new Set(c.members);
  c.members = engineConv.rosters.get(engineConv.epoch).pids.slice();
  // The gateway tells a participant's presence to those who share a conversation with
  // it; new members learn ours when we say it again.
  if (S.caughtUp && c.members.some((p) => !before.has(p))) publishStatus("online");
  await saveConv(c);
  await fetchBundles(cid);
  await publishAll([...publications, ...await S.engine.payOwedGrants()]);
  if (live && c.removed && !wasRemoved) note(cid, "You were removed from this conversation.");
  await retryHeld(cid);
  view.renderList();
  if (S.active === cid) { view.renderHeader(); view.renderMembers(); }
}

// Our inbox: grants, and rosters an inviting admin sends (kind byte 0x12).
async function onInbox(cid, data) {
  let result;
  try {
    result = await S.engine.handleInbox(data);
  } catch (err) {
    if (!(err instanceof FieldchatError)) throw err;
    if (err.reason === "roster_pending") await wantRosters(err.cid);
    return;
  }
  if (result.roster) await afterRosters(cid, result.publications, true);
  else {
    if (result.publications?.length) await publishAll(result.publications);
    if (result.installed || result.ends) await retryHeld(result.cid);
  }
}

async function fetchBundles(cid) {
  const roster = S.engine.isMember(cid) || S.engine.convs.get(cid)?.epoch >= 0 ? S.engine.roster(cid) : null;
  if (!roster) return;
  for (const m of roster.members) {
    if (m.pid !== S.engine.pid) await learnBundle(m.pid);
  }
}

async function learnBundle(pid) {
  let found;
  try {
    found = await api("GET", `/v1/participants/${pid}/bundle`);
  } catch {
    return false;
  }
  await S.engine.learnBundle(fromB64(found.bundle)); // a pid's key never changes (§2.3)
  return true;
}

async function payOwed() {
  await publishAll(await S.engine.payOwedGrants());
}

// -- envelopes ------------------------------------------------------------------------------

const idOf = (cid, h) => `${cid}/${h.epoch}/${h.sender}/${h.chain}/${h.step}`;

// One envelope, from the live feed, history or the held ones. The archive may hold several
// unsigned candidates of one (epoch, sender, chain, step) besides the genuine one
// (docs/gateway.md): a candidate that does not open leaves nothing behind (no message, no
// receipt, nothing marked done), so the genuine one opens whichever comes first.
async function onEnvelope(cid, seq, data, live) {
  let header;
  try { header = readHeader(data); } catch { return; }
  const id = idOf(cid, header);
  const c = conv(cid);
  const stored = c.messages.get(id) ?? await S.store.message(id);
  const own = S.engine.senderOf(cid, data) === S.engine.pid;
  if (own || stored) {
    if (stored && stored.seq == null) { // our own echo, or a copy now archived
      stored.seq = seq;
      if (stored.state === "queued") stored.state = "sent";
      await keep(stored);
    }
    if (own || stored.trust !== "pending") return;
    // Another candidate of a pending step: the engine may keep it (§6.5).
    try { await S.engine.open(cid, data); } catch (err) { if (!(err instanceof FieldchatError)) throw err; }
    await settle(cid);
    return;
  }
  let opened;
  try {
    opened = await S.engine.open(cid, data);
  } catch (err) {
    if (!(err instanceof FieldchatError)) throw err;
    if (HOLD.has(err.reason)) hold(cid, seq, data, header, err.reason === "unsigned_jump");
    if (err.reason === "unsigned_jump") await reachHeld(cid, header); // its try extended the reach
    return;
  }
  if (!opened) { await settle(cid); return; } // another candidate may settle pending ones
  await reachHeld(cid, header);
  const m = opened.message;
  if (m.kind === MSG.text) {
    const reading = live && S.active === cid && document.visibilityState === "visible";
    await keep({ id, cid, seq, sender: opened.sender, sentAt: m.sentAt, text: m.text, mine: false,
                 read: reading, epoch: opened.epoch, senderIndex: opened.senderIndex,
                 chain: opened.chain, step: opened.step, trust: opened.pending ? "pending" : undefined });
    addReceipt(cid, 1, opened);
    if (reading) addReceipt(cid, 2, opened);
  } else if (m.kind === MSG.receipt) {
    await onReceipt(cid, opened.sender, m);
  } else if (m.kind === MSG.control && m.op === 1 && opened.signed) {
    note(cid, `${short(opened.sender)} left the conversation.`);
  }
  await settle(cid);
}

// Pending unsigned messages verified or flagged forged (PROTOCOL.md §6.5).
async function settle(cid) {
  for (const done of S.engine.takeSettled()) {
    for (const step of done.steps) {
      const id = `${cid}/${done.epoch}/${done.senderIndex}/${done.chain}/${step}`;
      const m = conv(cid).messages.get(id) ?? await S.store.message(id);
      if (m && m.trust === "pending") { m.trust = done.verdict; await keep(m); }
    }
    if (done.verdict === "forged") {
      note(cid, `⚠ FORGERY: ${done.pinpointed ? "" : "one or more of "}${done.steps.length} ` +
                `message(s) shown as from ${short(done.sender)} were NOT sent by them: another ` +
                "member of this conversation forged them.");
    }
  }
}

function hold(cid, seq, data, h, far) {
  const list = S.held.get(cid) ?? [];
  if (seq != null && list.some((x) => x.seq === seq)) return; // the same archived envelope
  if (list.length >= MAX_HELD) list.shift(); // oldest dropped; history has it
  list.push({ seq, data, far, epoch: h.epoch, sender: h.sender, chain: h.chain, step: h.step });
  S.held.set(cid, list);
  S.store.put(`ui/held/${cid}`, list); // the cursor moves past it: keep it across a reload
}

function setHeld(cid, list) {
  if (list.length) {
    S.held.set(cid, list);
    return S.store.put(`ui/held/${cid}`, list);
  }
  S.held.delete(cid);
  return S.store.delete(`ui/held/${cid}`);
}

// After a roster or grant: try again what waited for keys, rosters or chain ends. Those
// out of reach wait for their chain instead (reachHeld).
async function retryHeld(cid) {
  const list = S.held.get(cid);
  if (!list?.some((x) => !x.far)) return;
  await setHeld(cid, list.filter((x) => x.far));
  for (const { seq, data } of list.filter((x) => !x.far)) await onEnvelope(cid, seq, data, true);
}

// After an envelope of a chain opened or extended its reach: try once more those of that
// chain held as out of reach that are within it now (an honest sender far ahead is reached
// 512 steps per envelope it sends; junk is tried once more and dropped).
async function reachHeld(cid, h) {
  const list = S.held.get(cid);
  const reach = list ? S.engine.reach(cid, h.epoch, h.sender, h.chain) : null;
  if (reach === null) return;
  const due = (x) => x.far && x.epoch === h.epoch && x.sender === h.sender && x.chain === h.chain && x.step <= reach;
  if (!list.some(due)) return;
  await setHeld(cid, list.filter((x) => !due(x)));
  for (const x of list.filter(due).sort((a, b) => a.step - b.step)) await onEnvelope(cid, x.seq, x.data, true);
}

async function onReceipt(cid, from, receipt) {
  // A gap request (type 3, PROTOCOL.md §4.1) names steps a member lacks, not ones it
  // has: ignored here (the sender's device answers it; a browser keeps no outbox of
  // its own envelopes to publish again).
  if (receipt.type !== 1 && receipt.type !== 2) return;
  const c = await loadConv(cid);
  for (const [epoch, sender, chain, first, last] of receipt.ranges) {
    for (let step = first; step <= last && step - first < 10000; step++) {
      const m = c.messages.get(`${cid}/${epoch}/${sender}/${chain}/${step}`);
      if (!m || !m.mine) continue;
      m.receipts ??= {};
      const before = m.receipts[from] ?? 0;
      if (receipt.type > before) {
        m.receipts[from] = receipt.type;
        m.state = stateOf(c, m);
        await keep(m);
      }
    }
  }
}

// delivered when every other member has it, read when every other member read it.
function stateOf(c, m) {
  if (!m.seq && m.state === "queued") return "queued";
  const others = c.members.filter((p) => p !== S.engine.pid);
  const r = m.receipts ?? {};
  if (others.length && others.every((p) => r[p] === 2)) return "read";
  if (others.length && others.every((p) => r[p] >= 1)) return "delivered";
  return m.state === "failed" ? "failed" : "sent";
}

function addReceipt(cid, type, o) {
  const key = `${cid}|${type}`;
  const set = S.receipts.get(key) ?? new Set();
  set.add(`${o.epoch}/${o.senderIndex}/${o.chain}/${o.step}`);
  S.receipts.set(key, set);
  saveReceipts();
}

// Receipts owed survive a reload: the messages are already marked read on this side.
function saveReceipts() {
  return S.store.put("ui/receipts", [...S.receipts].map(([k, set]) => [k, [...set]]));
}

async function flushReceipts() {
  if (!S.caughtUp || !S.receipts.size) return;
  const pending = [...S.receipts];
  S.receipts.clear();
  for (const [key, set] of pending) {
    const [cid, type] = key.split("|");
    if (!S.engine.isMember(cid)) continue;
    const steps = [...set].map((s) => s.split("/").map(Number))
      .sort((a, b) => a[0] - b[0] || a[1] - b[1] || a[2] - b[2] || a[3] - b[3]);
    const ranges = [];
    for (const [e, s, ch, st] of steps) {
      const last = ranges[ranges.length - 1];
      if (last && last[0] === e && last[1] === s && last[2] === ch && last[4] === st - 1) last[4] = st;
      else ranges.push([e, s, ch, st, st]);
    }
    try {
      for (let i = 0; i < ranges.length; i += 256) {
        const sealed = await S.engine.seal(cid, { kind: MSG.receipt, type: Number(type), ranges: ranges.slice(i, i + 256) });
        await S.bridge.publish("msg", sealed.data, { cid });
      }
    } catch (err) {
      if (err.reason !== "transport") continue; // refused: dropping it is all we can do
      const again = S.receipts.get(key) ?? new Set();
      for (const s of set) again.add(s);
      S.receipts.set(key, again);
    }
  }
  await saveReceipts();
}

// -- messages in memory, in IndexedDB and on screen -------------------------------------------

async function keep(m) {
  const c = conv(m.cid);
  c.messages.set(m.id, m);
  await S.store.putMessage(m);
  if (S.active === m.cid) view.renderMessage(m);
  else view.renderList();
}

function note(cid, text) {
  const id = `note/${cid}/${Date.now()}/${Math.random()}`;
  keep({ id, cid, seq: Infinity, note: true, text, sentAt: Math.floor(Date.now() / 1000), read: true });
}

async function loadConv(cid) {
  const c = conv(cid);
  if (!c.loaded) {
    for (const m of await S.store.messagesOf(cid)) if (!c.messages.has(m.id)) c.messages.set(m.id, m);
    c.loaded = true;
  }
  return c;
}

async function saveConv(c) {
  await S.store.put(`ui/conv/${c.cid}`, { cid: c.cid, members: c.members, removed: c.removed,
    historyBefore: c.historyBefore, historyDone: c.historyDone });
}

// A page of history, newest first from the gateway, opened oldest first (chains run forward).
async function loadHistory(cid) {
  const c = conv(cid);
  if (c.historyDone) return 0;
  const q = new URLSearchParams({ limit: PAGE });
  if (c.historyBefore !== null) q.set("before", c.historyBefore);
  const page = await api("GET", `/v1/conversations/${cid}/envelopes?${q}`);
  for (const item of [...page.items].reverse()) await onEnvelope(cid, item.seq, fromB64(item.envelope), false);
  c.historyBefore = page.next_before;
  c.historyDone = !page.more;
  await saveConv(c);
  return page.items.length;
}

// -- sending ---------------------------------------------------------------------------------

// Sends keep their order (S.sending). One for an epoch whose secret is on its way (PROTOCOL.md
// §6.6, one inbox hop) waits outside `serial`, where the frame that brings it is queued.
function send(cid, text) {
  const turn = S.sending.then(async () => {
    for (let i = 0; ; i++) {
      const wait = await serial(async () => {
        if (i < KEY_WAIT_TRIES && S.engine.isMember(cid) && !S.engine.keyed(cid)) return true;
        await sealText(cid, text);
      });
      if (!wait) return;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  });
  S.sending = turn.catch(() => {});
  return turn;
}

async function sealText(cid, text) {
  const sealed = await S.engine.seal(cid, { kind: MSG.text, sentAt: Math.floor(Date.now() / 1000), text });
  const [, epoch, sender, chain, step] = sealed.key;
  const id = sealed.key.join("/");
  await keep({ id, cid, seq: null, sender: S.engine.pid, sentAt: Math.floor(Date.now() / 1000), text,
               mine: true, read: true, state: "queued", receipts: {}, epoch, senderIndex: sender, chain, step,
               local: Date.now() });
  await S.store.queue({ kind: "msg", cid, id, data: sealed.data, attempts: 0 });
  flushOutbox();
}

// What the engine wants published, in order: rosters (kind "roster": the gateway verifies
// one and retains it on c/{cid}/roster, which we never write, §5.2), grants. The earlier
// rosters an admin sends a new member's inbox (kind "inbox") have no /ws frame yet
// (gateway/_ws.py takes only grants for inboxes): a new member with a gateway fetches them
// there; a device without one holds the new roster until they come (docs/web.md).
async function publishAll(publications) {
  const out = publications.filter((p) => p.kind !== "inbox");
  for (const p of out) {
    await S.store.queue({ kind: p.kind, data: p.data, cid: p.cid, recipient: p.recipient, attempts: 0 });
  }
  if (out.length) flushOutbox();
}

// The outbox leaves in order whenever the bridge is caught up; an entry is deleted only
// after the gateway's ack (the broker's PUBACK), so a drop means sending again, and the
// archive and every receiver deduplicate on (cid, epoch, sender, chain, step).
async function flushOutbox() {
  if (S.flushing) return;
  S.flushing = true;
  try {
    for (let round = 0; round < 1000 && S.caughtUp; round++) {
      const items = await S.store.outbox();
      if (!items.length) break;
      const item = items[0];
      try {
        const extra = {};
        if (item.cid) extra.cid = item.cid;
        if (item.recipient) extra.recipient = item.recipient;
        await S.bridge.publish(item.kind, item.data, extra);
        await S.store.unqueue(item.n);
        if (item.id) await markSent(item.cid, item.id);
      } catch (err) {
        const transient = ["transport", "not_member", "unavailable"].includes(err.reason);
        item.attempts = (item.attempts || 0) + 1;
        if (transient && item.attempts < MAX_ATTEMPTS) {
          await S.store.update(item);
          if (!S.bridge.open) break;
          await new Promise((r) => setTimeout(r, RETRY_MS));
        } else {
          await S.store.unqueue(item.n);
          if (item.id) await markFailed(item.cid, item.id);
        }
      }
    }
  } finally {
    S.flushing = false;
  }
}

async function markSent(cid, id) {
  const c = await loadConv(cid);
  const m = c.messages.get(id);
  if (m && m.state === "queued") { m.state = "sent"; await keep(m); }
}

async function markFailed(cid, id) {
  const c = await loadConv(cid);
  const m = c.messages.get(id);
  if (m) { m.state = "failed"; await keep(m); }
}

async function publishStatus(text) {
  try { await S.bridge.publish("status", utf8(text), { pid: S.engine.pid }); } catch { /* presence is best effort */ }
}

// -- conversations: create, invite, remove -----------------------------------------------------

// `requirePq` (the default): every member must have an ML-KEM-768 key (PROTOCOL.md §5.2).
async function createConversation(pids, { requirePq = true } = {}) {
  for (const pid of pids) {
    if (!(await learnBundle(pid))) throw new Error(`No participant ${pid} is known to the gateway.`);
  }
  const policy = { signEvery: 1, compress: false, pad: false, requirePq };
  const { cid, publications } = await S.engine.createConversation(pids, { policy });
  const c = conv(cid);
  c.members = [S.engine.pid, ...pids];
  c.historyDone = true; // nothing before its first roster
  await saveConv(c);
  await publishAll(publications);
  return cid;
}

async function invite(cid, pid) {
  if (!(await learnBundle(pid))) throw new Error(`No participant ${pid} is known to the gateway.`);
  await publishAll(await S.engine.addMembers(cid, [pid]));
  await afterRotation(cid);
}

async function removeMember(cid, pid) {
  await publishAll(await S.engine.removeMembers(cid, [pid]));
  await afterRotation(cid);
}

async function afterRotation(cid) {
  const c = conv(cid);
  c.members = S.engine.roster(cid).members.map((m) => m.pid);
  await saveConv(c);
  view.renderHeader();
  view.renderMembers();
  view.renderList();
}

// -- what the user did -------------------------------------------------------------------------

// The user compared the fingerprint.
async function markVerified(pid) {
  await S.engine.markVerified(pid);
}

// The conversation is on screen: its messages are read (receipts sent with the next flush).
async function markRead(cid) {
  const c = conv(cid);
  for (const m of c.messages.values()) {
    if (!m.mine && !m.note && !m.read) {
      m.read = true;
      await S.store.putMessage(m);
      addReceipt(cid, 2, m);
    }
  }
  view.renderList();
}

export {
  S, attach, conv, connect, createConversation, goOffline, goOnline, invite, loadConv, loadHistory,
  logOut, markRead, markVerified, openSession, removeMember, send, serial, short, signIn, stateOf,
  syncConversation, whoAmI,
};
