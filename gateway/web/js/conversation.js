// One conversation in the engine (as `Conversation` in device/_conversation.py): its adopted
// rosters and the held ones, the epoch entered, our sending chain and the grants we owe,
// the receiving chains and the ends their senders stated. The rules here need no keys:
// which rosters are kept, which held ones chain now (§5.2), which epochs are closed (§6.4),
// and what the store keeps of it; the engine (engine.js) decides when they apply.

import { decodeId, hex } from "./bytes.js";
import { RecvChain } from "./chains.js";
import { decodeRoster, verifyRosterChain } from "./wire.js";

// Epochs whose envelopes are still opened (receiving chains, chain ends); older rosters
// are kept all the same: joining and catching up need the whole chain.
export const KEEP_EPOCHS = 4;
// Rosters held per conversation until the epochs between arrive; past it the oldest is
// dropped (counted `roster_pool_evicted`; the gateway has it again).
export const MAX_ROSTER_CANDIDATES = 64;

const POOL = "rosterpool/";
const rosterKey = (cid, epoch) => `roster/${cid}/${String(epoch).padStart(8, "0")}`;
const poolKey = (cid, digest) => `${POOL}${cid}/${digest.slice(0, 32)}`;

export class Conversation {
  // `epoch` -1: not entered (joining, or known only from held rosters or grants).
  constructor(cid, epoch) {
    Object.assign(this, {
      cid, cidRaw: decodeId(cid), epoch, tip: -1, rosters: new Map(), keptEpochs: [],
      candidates: new Map(), removed: epoch < 0, send: null, grantBase: null, owed: new Set(),
      recv: new Map(), pending: [], closed: new Set(), ends: new Map(), sentEnds: [],
    });
  }

  // A kept roster (one of the newest KEEP_EPOCHS adopted), or undefined.
  kept(epoch) { return this.keptEpochs.includes(epoch) ? this.rosters.get(epoch) : undefined; }

  // What the store keeps under `conv/{cid}`; rosters (rosterKey) and held ones (poolKey)
  // are stored apart, once each.
  get record() {
    return {
      cid: this.cid, epoch: this.epoch, removed: this.removed,
      send: this.send, grantBase: this.grantBase, owed: [...this.owed],
      recv: [...this.recv.values()].map((c) => c.record), pending: this.pending,
      ends: [...this.ends], sentEnds: this.sentEnds,
    };
  }

  // Record a roster whose chain was verified: it becomes the tip. Stored once, apart from
  // the conversation's record (which is written at every seal).
  async adopt(store, roster) {
    this.rosters.set(roster.epoch, roster);
    this.tip = roster.epoch;
    this.keptEpochs = [...this.keptEpochs, roster.epoch].sort((a, b) => a - b).slice(-KEEP_EPOCHS);
    await store.put(rosterKey(this.cid, roster.epoch), roster.bytes);
  }

  // Hold a roster that does not chain yet, dropping the oldest past MAX_ROSTER_CANDIDATES.
  async holdCandidate(store, roster, count) {
    const digest = hex(roster.digest);
    if (this.candidates.has(digest)) { count("duplicate"); return; }
    if (this.candidates.size >= MAX_ROSTER_CANDIDATES) {
      const [oldest] = this.candidates.keys();
      this.candidates.delete(oldest);
      await store.delete(poolKey(this.cid, oldest));
      count("roster_pool_evicted");
    }
    this.candidates.set(digest, roster);
    await store.put(poolKey(this.cid, digest), roster.bytes);
  }

  // Adopt held rosters that now chain, epoch after epoch (among several of the next epoch,
  // first one a held roster of the epoch after names as prev); drop those left behind. At
  // most MAX_ROSTER_CANDIDATES chain checks per epoch adopted.
  async adoptCandidates(store, count) {
    while (this.candidates.size) {
      for (const [digest, r] of [...this.candidates]) {
        if (r.epoch <= this.tip) { this.candidates.delete(digest); await store.delete(poolKey(this.cid, digest)); }
      }
      const held = [...this.candidates];
      const successors = new Set(held.filter(([, r]) => r.epoch === this.tip + 2).map(([, r]) => hex(r.prev)));
      const next = held.filter(([, r]) => r.epoch === this.tip + 1)
        .sort(([a], [b]) => successors.has(b) - successors.has(a));
      const tip = this.rosters.get(this.tip) ?? null;
      let chosen = null;
      for (const [digest, r] of next) {
        this.candidates.delete(digest);
        await store.delete(poolKey(this.cid, digest));
        try {
          await verifyRosterChain(r, tip);
        } catch (err) {
          if (err.reason !== "roster") throw err;
          count("roster");
          continue;
        }
        chosen = r;
        break;
      }
      if (!chosen) return;
      await this.adopt(store, chosen);
    }
  }

  // Kept epochs before ours with a member a later roster no longer lists: someone removed
  // since holds their chain keys (a roster we lack counts as a removal).
  closedEpochs() {
    const out = new Set();
    for (const epoch of this.keptEpochs) {
      const members = this.rosters.get(epoch).pids;
      for (let later = epoch + 1; later <= this.epoch; later++) {
        const r = this.rosters.get(later);
        if (!r || !members.every((p) => r.pids.includes(p))) { out.add(epoch); break; }
      }
    }
    return out;
  }

  // Enter the epoch of an adopted roster: drop what removed members could use and record
  // where our sending chain ended. The new chains come from the epoch's secret (§6.1):
  // until it is here (we drew it, or its delivery arrived) nothing is sealed.
  enter(roster, pid) {
    this.epoch = roster.epoch;
    const current = new Set(roster.pids);
    for (const [key, chain] of this.recv) {
      const r = this.kept(chain.epoch);
      if (!r || !current.has(r.pids[chain.sender])) this.recv.delete(key);
    }
    for (const key of this.ends.keys()) if (!this.recv.has(key)) this.ends.delete(key);
    this.closed = this.closedEpochs();
    if (this.send) {
      // Receivers take unsigned envelopes of this chain only below this step once someone
      // was removed (§6.4): every step we sealed is below it (each is persisted first).
      this.sentEnds = [...this.sentEnds, [this.send.epoch, this.send.chain, this.send.step]].slice(-KEEP_EPOCHS);
    }
    this.removed = !current.has(pid);
    this.send = null;
    this.grantBase = null;
    this.owed = new Set();
  }

  // Whether the epoch `roster` is keyed here: every other member's chain 0 held and, for
  // the current epoch, our sending chain.
  keyed(roster, pid) {
    const others = roster.pids.every((p, i) => p === pid || this.recv.has(`${roster.epoch}/${i}/0`));
    return others && (roster.epoch !== this.epoch || this.send !== null);
  }

  // Record where a sender's earlier chains ended, for chains we hold (§6.5); a lower
  // end stated again wins: a sender's end only ever refuses more. How many changed.
  learnEnds(granter, ends) {
    let learned = 0;
    for (const [epoch, chain, nextStep] of ends) {
      const index = this.kept(epoch)?.pids.indexOf(granter) ?? -1;
      const key = `${epoch}/${index}/${chain}`;
      if (index < 0 || !this.recv.has(key)) continue;
      const known = this.ends.get(key);
      if (known === undefined || nextStep < known) {
        this.ends.set(key, nextStep);
        learned++;
      }
    }
    return learned;
  }

  // Delete everything stored of it.
  async forget(store) {
    for (const epoch of this.rosters.keys()) await store.delete(rosterKey(this.cid, epoch));
    for (const digest of this.candidates.keys()) await store.delete(poolKey(this.cid, digest));
    await store.delete(`conv/${this.cid}`);
  }
}

// The conversations in `store`, and those whose record must be written again (it still
// held its rosters, as written before rosters were stored apart).
export async function loadConversations(store) {
  const convs = new Map();
  const held = (cid) => convs.get(cid) ?? convs.set(cid, new Conversation(cid, -1)).get(cid);
  const records = await store.entries("conv/");
  for (const [, rec] of records) {
    const conv = new Conversation(rec.cid, rec.epoch);
    Object.assign(conv, { removed: rec.removed, send: rec.send, grantBase: rec.grantBase,
                          owed: new Set(rec.owed), pending: rec.pending,
                          ends: new Map(rec.ends ?? []), sentEnds: rec.sentEnds ?? [] });
    convs.set(conv.cid, conv);
    // Written before rosters were stored apart: the newest KEEP_EPOCHS, adopted then.
    for (const bytes of rec.rosters ?? []) {
      const r = await decodeRoster(bytes);
      await store.put(rosterKey(r.cid, r.epoch), bytes);
      conv.rosters.set(r.epoch, r);
    }
  }
  for (const [, bytes] of await store.entries("roster/")) {
    const r = await decodeRoster(bytes);
    held(r.cid).rosters.set(r.epoch, r);
  }
  for (const [, bytes] of await store.entries(POOL)) {
    const r = await decodeRoster(bytes);
    held(r.cid).candidates.set(hex(r.digest), r);
  }
  for (const conv of convs.values()) {
    const epochs = [...conv.rosters.keys()].sort((a, b) => a - b);
    conv.tip = epochs.length ? epochs[epochs.length - 1] : -1;
    conv.keptEpochs = epochs.slice(-KEEP_EPOCHS);
    if (conv.epoch >= 0 && !conv.rosters.has(conv.epoch)) conv.epoch = -1; // nothing to enter
  }
  const resave = [];
  for (const [, rec] of records) {
    const conv = convs.get(rec.cid);
    for (const c of rec.recv) if (conv.kept(c.epoch)) conv.recv.set(`${c.epoch}/${c.sender}/${c.chain}`, new RecvChain(c));
    if (rec.rosters) resave.push(conv); // now without them
    if (conv.epoch >= 0) conv.closed = conv.closedEpochs();
  }
  return { convs, resave };
}
