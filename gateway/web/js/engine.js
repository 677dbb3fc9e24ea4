// The end-to-end engine of a browser participant (device/engine.py in Python; PROTOCOL.md
// §5-§7): conversations, rosters, epoch secrets, sending and receiving chains. Pure: no
// network; state goes to an injected store (IndexedDB in the page, memory in the vector
// checks). Where WebCrypto has ML-KEM-768 the prekeys have a key (`postQuantum`): the
// browser gets and makes hybrid deliveries and refuses X25519-only ones from post-quantum
// members (a downgrade). Where it has none the bundle says so, what it seals is X25519
// only, rosters mark it, and a conversation that requires post-quantum members (the
// default policy) cannot list it.
//
// Trust in rosters (§5.2): a roster is adopted only through a verified chain, from epoch 0
// when joining and from the newest adopted roster (the tip) when catching up; one that
// does not chain yet waits in a bounded pool (reason `roster_pending`: fetch the rosters
// between) and nothing is granted before its chain is verified. Every adopted roster is
// kept; KEEP_EPOCHS bounds what is opened. Unsigned envelopes of an epoch someone was
// removed after open only below the end their sender stated (§6.4, §7).
//
// The engine decides; what it decides about lives beside it: conversation.js (a
// conversation's state, adopting held rosters, closed epochs), bundles.js (trust on first
// use), identity.js (keys, signed rosters) and grants.js (deliveries and grants sealed and
// opened, updates; loaded when first needed).

import { CryptoError, FieldchatError, concat, decodeId, equal, protocolError } from "./bytes.js";
import { Bundles } from "./bundles.js";
import {
  MARK_EVERY, MAX_FORWARD_JUMP, MAX_SKIPPED_KEYS, MAX_UNSIGNED_JUMP,
} from "./chains.js";
import { KEEP_EPOCHS, MAX_ROSTER_CANDIDATES, Conversation, loadConversations } from "./conversation.js";
import {
  aeadSeal, chainStep, ed25519Sign, ed25519Verify, hybridOpen, hybridSeal, mlkemSupported, randomBytes, stepNonce,
} from "./crypto.js";
import { currentPrekey, generateIdentity, identityFromSeed, maintainPrekeys, signRoster } from "./identity.js";
import { MemoryStore } from "./store.js";
import {
  CONTROL, FLAG, MSG, cidFor, decodeBundle, decodePlaintext, decodeRoster, encodePlaintext, envelopeHeader,
  fingerprint, isAdmin, isDelivery, isRoster, readHeader, verifyRosterChain,
} from "./wire.js";

// This module is the browser participant's whole API (tests/web/pages import it).
export {
  CryptoError, KEEP_EPOCHS, MARK_EVERY, MAX_FORWARD_JUMP, MAX_ROSTER_CANDIDATES, MAX_SKIPPED_KEYS, MAX_UNSIGNED_JUMP,
  MemoryStore, generateIdentity, hybridOpen, hybridSeal, identityFromSeed, mlkemSupported,
};
export const MAX_PENDING_GRANTS = 256; // grants held per conversation until its epoch is entered
// Conversations known only from held rosters or grants, or rosters not listing us; past
// it the oldest such state is dropped (`joining_evicted`): an inbox flooded with rosters
// and grants of invented conversations stays bounded.
export const MAX_JOINING = 64;
const FLUSH_MS = 200; // receiving-chain state is written in batches (§6.4)

const rejected = (reason, why) => protocolError(reason, why);
// Controls sealed signed whatever the policy and acted on only when signed (§6.5).
const signedOnly = (m) => m.kind === MSG.control && m.op !== CONTROL.joined;
const coverageModule = () => import("./coverage.js");
// Keying (deliveries, grants, updates: grants.js), loaded once a conversation needs it.
const keying = () => import("./grants.js");

// The engine -----------------------------------------------------------------------------------

export class Engine {
  constructor(identity, store) {
    this.identity = identity;
    this.pid = identity.pid;
    this.store = store;
    this.counters = {};
    this.bundles = new Bundles(store);
    this.convs = new Map();
    this._queue = Promise.resolve();
    this._dirty = new Set();
    this._flushTimer = null;
    // Delayed authentication (§6.5): coverage.js, loaded when a conversation needs it.
    this.coverage = new Map();
    this.covering = new Map();
    this.settled = [];
    this._updates = new Map(); // cid -> Map(sender pid -> [prekey id, digest] | null) (§6.7)
  }

  // Verdicts since the last call: {cid, sender, epoch, senderIndex, chain, steps, verdict, pinpointed}.
  takeSettled() {
    const out = this.settled;
    this.settled = [];
    return out;
  }

  // The engine of the identity in `store`, generating one on first use.
  static async open(store, { identity = null } = {}) {
    let stored = await store.get("identity");
    if (!stored) {
      stored = identity ?? await generateIdentity();
      await store.put("identity", stored);
    }
    const engine = new Engine(stored, store);
    await engine._load();
    return engine;
  }

  // Serialize the public entry points: state changes span awaits.
  _locked(fn) {
    const run = this._queue.then(fn, fn);
    this._queue = run.catch(() => {});
    return run.catch((err) => {
      if (err instanceof FieldchatError) this.counters[err.reason] = (this.counters[err.reason] || 0) + 1;
      throw err;
    });
  }

  count(reason) { this.counters[reason] = (this.counters[reason] || 0) + 1; }

  get bundle() { return this.identity.bundle; }

  // Whether this identity has an ML-KEM-768 key (hybrid grants) or is X25519 only.
  get postQuantum() { return !!currentPrekey(this.identity).kPublic; }

  get _self() { return { pid: this.pid, key: this.identity.edPublic, postQuantum: this.postQuantum }; }

  // An X25519-only seal is right only from a sender the roster marks as not post-quantum,
  // and never in an epoch that requires post-quantum members (§5.2, §5.3).
  _x25519Ok(roster, sender) {
    return !!roster && !roster.policy.requirePq && !(roster.members.find((m) => m.pid === sender)?.pq ?? true);
  }

  // -- bundles ------------------------------------------------------------------------------

  // Trust on first use; a newer bundle with other keys is accepted and reported loudly.
  learnBundle(data) { return this._locked(() => this.bundles.learn(data)); }

  bundleOf(pid) { return pid === this.pid ? null : this.bundles.get(pid) ?? null; }

  async fingerprintOf(pid) {
    if (pid === this.pid) return fingerprint(await decodeBundle(this.identity.bundle));
    const b = this.bundles.get(pid);
    return b ? fingerprint(b) : null;
  }

  markVerified(pid) { return this._locked(() => this.bundles.markVerified(pid)); }

  get verified() { return this.bundles.verified; }

  // -- conversations ---------------------------------------------------------------------------

  conversations() { return [...this.convs.values()].filter((c) => c.epoch >= 0).map((c) => c.cid).sort(); }

  roster(cid) { return this._conv(cid).rosters.get(this._conv(cid).epoch); }

  isMember(cid) { const c = this.convs.get(cid); return !!c && c.epoch >= 0 && !c.removed; }

  owedGrants(cid) { return new Set(this._conv(cid).owed); }

  // The furthest step of a receiving chain an unsigned envelope can be tried at now (null
  // before its grant): one refused as `unsigned_jump` is worth one more try once this
  // passes its step (§6.4).
  reach(cid, epoch, sender, chain) {
    return this.convs.get(cid)?.recv.get(`${epoch}/${sender}/${chain}`)?.reach() ?? null;
  }

  _conv(cid) {
    const conv = this.convs.get(cid);
    if (!conv || conv.epoch < 0) throw rejected("unknown_conversation", `unknown conversation ${String(cid).slice(0, 40)}`);
    return conv;
  }

  // Found a conversation with us as admin: its cid and what to publish. A new roster goes
  // out as kind "roster": through /ws the gateway, as the verifier, retains it on
  // c/{cid}/roster once it chains (§5.2); a participant never writes that topic itself.
  createConversation(members = [], { policy = null } = {}) {
    return this._locked(async () => {
      // Default policy (PROTOCOL.md §5.2): every envelope signed, post-quantum members only.
      const pol = policy ?? { signEvery: 1, compress: false, pad: false, requirePq: true };
      const nonce = randomBytes(16);
      const cid = await cidFor(this.pid, nonce);
      const secret = randomBytes(32);
      const roster = await signRoster(this.identity, {
        cid, epoch: 0, nonce, prev: new Uint8Array(0), policy: pol,
        members: this.bundles.members(this._self, [this.pid, ...members], new Set([this.pid]), pol),
        issuedAt: Math.floor(Date.now() / 1000), commit: await (await keying()).epochCommit(secret, decodeId(cid), 0),
      });
      await verifyRosterChain(roster, null);
      const conv = new Conversation(cid, 0);
      this.convs.set(cid, conv);
      await conv.adopt(this.store, roster);
      return { cid, publications: [{ kind: "roster", data: roster.bytes }, ...await this._enterEpoch(conv, roster, secret)] };
    });
  }

  addMembers(cid, pids) {
    return this._locked(async () => {
      const conv = this._conv(cid);
      const current = conv.rosters.get(conv.epoch);
      const all = [...current.pids, ...pids];
      const admins = new Set(current.members.filter((m) => m.admin).map((m) => m.pid));
      return this._rotate(conv, all, admins, current.policy);
    });
  }

  // A new epoch without `pids`: keyed by a new secret delivered to those who remain (§6.1).
  removeMembers(cid, pids) {
    return this._locked(async () => {
      const conv = this._conv(cid);
      const current = conv.rosters.get(conv.epoch);
      const drop = new Set(pids);
      const keep = current.pids.filter((p) => !drop.has(p));
      const admins = new Set(current.members.filter((m) => m.admin && !drop.has(m.pid)).map((m) => m.pid));
      return this._rotate(conv, keep, admins, current.policy);
    });
  }

  async _renew(conv) { // the same members and policy, a new secret (§6.7)
    const current = conv.rosters.get(conv.epoch);
    const admins = new Set(current.members.filter((m) => m.admin).map((m) => m.pid));
    return this._rotate(conv, [...current.pids], admins, current.policy);
  }

  // The new roster, then the earlier rosters for each new member's inbox (kind "inbox",
  // one roster each: it must verify the chain from epoch 0 before it trusts the new one,
  // §5.2), then the deliveries of the new epoch's secret (we drew it).
  async _rotate(conv, pids, admins, policy) {
    const current = conv.rosters.get(conv.epoch);
    if (conv.removed || !isAdmin(current, this.pid)) {
      throw rejected("not_member", `only an admin of ${conv.cid} can change its roster`);
    }
    if (![...admins].some((a) => pids.includes(a))) admins = new Set([pids.includes(this.pid) ? this.pid : pids[0]]);
    const secret = randomBytes(32);
    const roster = await signRoster(this.identity, {
      cid: conv.cid, epoch: current.epoch + 1, nonce: new Uint8Array(0), prev: current.digest,
      members: this.bundles.members(this._self, pids, admins, policy), policy,
      issuedAt: Math.floor(Date.now() / 1000), commit: await (await keying()).epochCommit(secret, conv.cidRaw, current.epoch + 1),
    });
    await verifyRosterChain(roster, current);
    const earlier = [...conv.rosters.keys()].sort((a, b) => a - b).map((e) => conv.rosters.get(e).bytes);
    const history = roster.pids.filter((p) => !current.pids.includes(p))
      .flatMap((recipient) => earlier.map((data) => ({ kind: "inbox", recipient, data })));
    await conv.adopt(this.store, roster);
    return [{ kind: "roster", data: roster.bytes }, ...history, ...await this._enterEpoch(conv, roster, secret)];
  }

  // What arrived in our inbox: a roster an inviting admin sent (handleRoster's
  // publications), an epoch secret's delivery or a grant (handleGrant's result). Kind
  // byte 0x12 is a roster (§5.2), 0x13 a delivery (§5.3), 0x10 a grant (§5.4).
  handleInbox(data) {
    return this._locked(async () => (isRoster(data)
      ? { roster: true, publications: await this._handleRoster(data) }
      : this._handleKey(data)));
  }

  // Take a roster (from the roster topic, the inbox or the gateway); return our grants
  // for its epoch once we enter it. Throws reason `roster` (does not follow the adopted
  // chain: forged, stale, bad signer) or `roster_pending` (held until the epochs between
  // arrive: fetch them; the error carries cid, have = the tip, want = its epoch).
  handleRoster(data) { return this._locked(() => this._handleRoster(data)); }

  async _handleRoster(data) {
    const roster = await decodeRoster(data);
    let conv = this.convs.get(roster.cid);
    const fresh = !conv;
    if (fresh) conv = await this._joining(roster.cid);
    try {
      return await this._takeRoster(conv, roster);
    } catch (err) {
      if (fresh && err.reason === "roster") this.convs.delete(roster.cid);
      throw err;
    }
  }

  async _takeRoster(conv, roster) {
    const known = conv.rosters.get(roster.epoch);
    if (known) {
      if (equal(known.digest, roster.digest)) { this.count("duplicate"); return []; }
      throw rejected("roster", `another roster of epoch ${roster.epoch} is adopted`);
    }
    if (roster.epoch <= conv.tip) throw rejected("roster", `roster epoch ${roster.epoch} is older than those kept`);
    if (roster.epoch !== conv.tip + 1) {
      await conv.holdCandidate(this.store, roster, (reason) => this.count(reason));
      throw Object.assign(
        rejected("roster_pending", `roster epoch ${roster.epoch} of ${roster.cid} waits for the epochs after ${conv.tip}`),
        { cid: roster.cid, have: conv.tip, want: roster.epoch });
    }
    await verifyRosterChain(roster, conv.rosters.get(conv.tip) ?? null);
    await conv.adopt(this.store, roster);
    await conv.adoptCandidates(this.store, (reason) => this.count(reason));
    return this._followTip(conv);
  }

  // State for a conversation not joined yet, dropping the oldest such state past MAX_JOINING.
  async _joining(cid) {
    const joining = [...this.convs.values()].filter((c) => c.epoch < 0);
    if (joining.length >= MAX_JOINING) {
      this.convs.delete(joining[0].cid);
      await joining[0].forget(this.store);
      this.count("joining_evicted");
    }
    const conv = new Conversation(cid, -1);
    this.convs.set(cid, conv);
    return conv;
  }

  // Enter the newest adopted epoch: at once when we are in the conversation, when joining
  // only once a verified roster lists us.
  async _followTip(conv) {
    if (conv.tip === conv.epoch) return [];
    const tip = conv.rosters.get(conv.tip);
    if (conv.epoch < 0 && !tip.pids.includes(this.pid)) return [];
    return this._enterEpoch(conv, tip);
  }

  // Enter an adopted epoch (§6.6). `secret`: we drew it: key the epoch, deliver it.
  async _enterEpoch(conv, roster, secret = null) {
    conv.enter(roster, this.pid);
    const publications = [];
    if (secret && !conv.removed) {
      conv.grantBase = { epoch: roster.epoch, secret };
      conv.owed = new Set(roster.pids.filter((p) => p !== this.pid));
      publications.push(...await this._keyEpoch(conv, roster, secret));
      publications.push(...await (await keying()).payDeliveries(this.identity, this.bundles, conv));
    }
    await this._save(conv);
    const pending = conv.pending;
    conv.pending = [];
    for (const data of pending) {
      try { publications.push(...(await this._handleKey(data)).publications ?? []); } catch (err) {
        if (!(err instanceof FieldchatError)) throw err;
        this.count(err.reason);
      }
    }
    if (pending.length) await this._save(conv);
    return publications;
  }

  async _keyEpoch(conv, roster, secret) { return (await keying()).keyEpoch(this, conv, roster, secret); }

  // Deliveries owed to members whose bundles have arrived since.
  payOwedGrants(cid = null) {
    return this._locked(async () => {
      const out = [];
      for (const conv of cid ? [this._conv(cid)] : [...this.convs.values()]) {
        if (conv.owed.size && conv.epoch >= 0) {
          const before = conv.owed.size;
          out.push(...await (await keying()).payDeliveries(this.identity, this.bundles, conv));
          if (conv.owed.size !== before) await this._save(conv);
        }
      }
      return out;
    });
  }

  // -- prekeys and updates (§2.5, §6.7) -------------------------------------------------------

  // Rotate a due prekey, delete old ones past grace (§2.5); the bundle if it rotated.
  maintainPrekeys(options = {}) {
    return this._locked(async () => {
      const { rotated, pruned } = await maintainPrekeys(this.identity, options);
      if (rotated || pruned) await this.store.put("identity", this.identity);
      return rotated ? [{ kind: "bundle", data: this.identity.bundle }] : [];
    });
  }

  // A new prekey (the old ones deleted) and a new epoch everywhere: ours as an admin,
  // asked for with UPDATE elsewhere (§6.7).
  update() { return this._locked(async () => (await keying()).update(this)); }

  // As an admin: a new epoch for each UPDATE (once we hold the prekey it names) or REKEY.
  answerUpdates() { return this._locked(async () => (await keying()).answerUpdates(this)); }

  // -- deliveries and grants -------------------------------------------------------------------

  // A delivery (§5.3) or a grant (§5.4).
  handleGrant(data) { return this._locked(() => this._handleKey(data)); }

  async _handleKey(data) {
    const k = await keying();
    return isDelivery(data) ? k.handleDelivery(this, data) : k.handleGrant(this, data);
  }

  async _hold(cid, data, conv) { // until its roster is adopted
    conv ??= await this._joining(cid);
    if (conv.pending.length >= MAX_PENDING_GRANTS) throw rejected("grant", "too many deliveries and grants waiting for their roster");
    conv.pending.push(data);
    await this._save(conv);
    return { cid, installed: false, needsRoster: true, ends: 0, publications: [] };
  }

  // -- messages --------------------------------------------------------------------------------

  // Encrypt (and per policy sign) a message: {kind, sentAt, text} | {kind, type, ranges} |
  // {kind, op}. The chain's next step is persisted before the envelope exists (§6.3).
  seal(cid, message) {
    return this._locked(async () => this._seal(this._conv(cid), message));
  }

  keyed(cid) { const c = this.convs.get(cid); return !!c && c.epoch >= 0 && !c.removed && !!c.send; }

  // `forceSign`: whatever the policy; controls other than JOINED always are (§6.5).
  async _seal(conv, message, forceSign = false) {
    if (signedOnly(message)) forceSign = true;
    const cid = conv.cid;
    const chain = conv.send;
    if (conv.removed) throw rejected("not_member", `not a member of ${cid}`);
    if (!chain) throw rejected("epoch_key_pending", `epoch ${conv.epoch} of ${cid}: its secret has not arrived`);
    const roster = conv.rosters.get(conv.epoch);
    const { data, compressed, padded } = await encodePlaintext(message, roster.policy);
    const step = chain.step;
    const out = chainStep(chain.key);
    chain.step = step + 1;
    chain.key = out.slice(32);
    await this._save(conv);
    const every = roster.policy.signEvery;
    const signed = forceSign || (every !== 0 && step % every === 0);
    const kindByte = message.kind | (signed ? FLAG.signed : 0) | (compressed ? FLAG.compressed : 0) |
                     (padded ? FLAG.padded : 0);
    const sender = roster.pids.indexOf(this.pid);
    // Each signed envelope covers the unsigned ones of this chain since the last (§6.5).
    const covering = every > 1 ? await (await coverageModule()).covering(this.covering, cid, chain, step, signed) : null;
    const header = envelopeHeader(kindByte, roster.epoch, sender, chain.chain, step, covering?.cover ?? 0);
    const aad = concat(header, conv.cidRaw, covering?.digest ?? new Uint8Array(0));
    const body = concat(header, await aeadSeal(out.subarray(0, 32), stepNonce(step), data, aad));
    if (!signed) {
      await covering?.add(body);
      return { data: body, key: [cid, roster.epoch, sender, chain.chain, step] };
    }
    const sig = await ed25519Sign(this.identity.edPrivate, concat(body, conv.cidRaw));
    return { data: concat(body, sig), key: [cid, roster.epoch, sender, chain.chain, step] };
  }

  // Authenticate and decrypt; null for a duplicate or our own envelope (counted `own`).
  // A refusal is typed by reason; `missing_key`, `chain_end_unknown` (retry when a grant
  // brings ends) and `unsigned_jump` (retry once reach() passes its step) are worth holding.
  open(cid, data) { return this._locked(() => this._open(cid, data)); }

  // The checks of PROTOCOL.md §6.4, in its order, each before any chain step is derived.
  async _open(cid, data) {
    const h = readHeader(data);
    const conv = this.convs.get(cid);
    if (!conv || conv.epoch < 0) throw rejected("unknown_conversation", `unknown conversation ${String(cid).slice(0, 40)}`);
    const roster = conv.kept(h.epoch);
    if (!roster) {
      if (h.epoch > conv.epoch) throw rejected("missing_key", `roster of epoch ${h.epoch} not known yet`);
      throw rejected("stale_epoch", `epoch ${h.epoch} is no longer kept`);
    }
    if (conv.removed && h.epoch >= conv.epoch) throw rejected("not_member", `removed from ${cid}`);
    const sender = roster.pids[h.sender];
    if (sender === undefined) throw rejected("not_member", `no member ${h.sender} at epoch ${h.epoch}`);
    if (sender === this.pid) { this.count("own"); return null; }
    if (h.epoch < conv.epoch && (conv.removed || !conv.rosters.get(conv.epoch).pids.includes(sender))) {
      throw rejected("stale_epoch", `${sender} was removed after epoch ${h.epoch}`);
    }
    const key = `${h.epoch}/${h.sender}/${h.chain}`;
    const chain = conv.recv.get(key);
    if (!chain) {
      if (h.epoch < conv.epoch && !roster.pids.includes(this.pid)) throw rejected("stale_epoch", `epoch ${h.epoch} is from before we joined`);
      throw rejected("missing_key", `no grant yet for ${sender} in epoch ${h.epoch}`);
    }
    let end = data.length;
    const signed = !!(h.flags & FLAG.signed);
    if (signed) {
      // Verified before any chain step: a forged signature costs one verification.
      end -= 64;
      await ed25519Verify(chain.signer, data.subarray(end), concat(data.subarray(0, end), conv.cidRaw));
    } else {
      if (roster.policy.signEvery && h.step % roster.policy.signEvery === 0) {
        throw rejected("unsigned", "the conversation policy requires a signature");
      }
      if (conv.closed.has(h.epoch)) {
        // Someone removed since holds this epoch's chain keys (§6.4, §7).
        const stated = conv.ends.get(key);
        if (stated === undefined) throw rejected("chain_end_unknown", `${sender} has not stated the end of epoch ${h.epoch}`);
        if (h.step >= stated) throw rejected("chain_closed", `unsigned step ${h.step} of epoch ${h.epoch}: ${sender} ended it at ${stated}`);
      }
    }
    const sealed = data.subarray(h.headerLength, end);
    const aad = concat(data.subarray(0, h.headerLength), conv.cidRaw);
    const covered = !signed && roster.policy.signEvery !== 0;
    let plaintext;
    if (h.cover || covered) { // pending until a signed envelope covers it (§6.5)
      plaintext = await (await coverageModule()).openCovered(this, cid, key, h, sender, chain, data, sealed, aad);
      if (plaintext === undefined) return null; // another candidate of a pending step
    } else {
      plaintext = await chain.open(h.step, sealed, aad, signed);
    }
    if (plaintext === null) { this.count("duplicate"); return null; }
    this._markDirty(cid);
    const message = await decodePlaintext(h.kind, plaintext,
      { compressed: !!(h.flags & FLAG.compressed), padded: !!(h.flags & FLAG.padded) });
    if (message.kind === MSG.control) await this._onControl(conv, sender, message, signed);
    return { cid, sender, epoch: h.epoch, senderIndex: h.sender, chain: h.chain, step: h.step, message, signed,
             pending: covered };
  }

  // Unsigned LEAVE, REKEY, ENDS, UPDATE are ignored: any member could seal them (§6.5).
  // ENDS; as an admin, UPDATE and REKEY requests (§6.7).
  async _onControl(conv, sender, message, signed) {
    if (signedOnly(message) && !signed) {
      this.count("unsigned_control");
    } else if (message.op === CONTROL.ends) {
      if (conv.learnEnds(sender, message.ends)) await this._save(conv);
    } else if ((message.op === CONTROL.update || message.op === CONTROL.rekey) && !conv.removed &&
               isAdmin(conv.rosters.get(conv.epoch), this.pid)) {
      if (!this._updates.has(conv.cid)) this._updates.set(conv.cid, new Map());
      this._updates.get(conv.cid).set(sender, message.op === CONTROL.update ? [message.prekeyId, message.prekeyDigest] : null);
    }
  }

  // Which participant sent an envelope (own ones included), without decrypting it.
  senderOf(cid, data) {
    const conv = this.convs.get(cid);
    if (!conv) return null;
    const h = readHeader(data);
    return conv.rosters.get(h.epoch)?.pids[h.sender] ?? null;
  }

  leave(cid) { return this.seal(cid, { kind: MSG.control, op: 1 }); }

  // -- persistence -----------------------------------------------------------------------------

  _markDirty(cid) {
    this._dirty.add(cid);
    this._flushTimer ??= setTimeout(() => { this._flushTimer = null; this.flush(); }, FLUSH_MS);
  }

  flush() {
    return this._locked(async () => {
      const dirty = [...this._dirty];
      this._dirty.clear();
      for (const cid of dirty) { const c = this.convs.get(cid); if (c) await this._save(c); }
    });
  }

  async _save(conv) {
    this._dirty.delete(conv.cid);
    await this.store.put(`conv/${conv.cid}`, conv.record);
  }

  async _load() {
    await this.bundles.load();
    const { convs, resave } = await loadConversations(this.store);
    this.convs = convs;
    for (const conv of resave) await this._save(conv);
  }
}
