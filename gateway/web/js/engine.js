// The end-to-end engine of a browser participant (device/engine.py in Python; PROTOCOL.md
// §5-§7): conversations, rosters, epoch secrets, sending and receiving chains. Pure: no
// network; state goes to an injected store (IndexedDB in the page, memory in the vector
// checks). No ML-KEM here yet: X25519-only, and rosters mark the browser so.
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
// use), identity.js and grants.js (keys, signed rosters, grants sealed and opened).

import { CryptoError, FieldchatError, concat, decodeId, equal, protocolError } from "./bytes.js";
import { Bundles } from "./bundles.js";
import {
  MARK_EVERY, MAX_FORWARD_JUMP, MAX_SKIPPED_KEYS, MAX_UNSIGNED_JUMP, RecvChain,
} from "./chains.js";
import { KEEP_EPOCHS, MAX_ROSTER_CANDIDATES, Conversation, loadConversations } from "./conversation.js";
import { aeadSeal, chainStep, ed25519Sign, ed25519Verify, randomBytes, sha256, stepNonce } from "./crypto.js";
import {
  acceptGrant, chainKey, epochCommit, makeDelivery, openDelivery, payDeliveries,
} from "./grants.js";
import { currentPrekey, generateIdentity, identityFromSeed, maintainPrekeys, signRoster } from "./identity.js";
import { MemoryStore } from "./store.js";
import { pack } from "./msgpack.js";
import {
  CONTROL, FLAG, MSG, cidFor, decodeBundle, decodeDelivery, decodeGrant, decodePlaintext, decodeRoster,
  encodePlaintext, envelopeHeader, fingerprint, isAdmin, isDelivery, isRoster, prekeyFields, readHeader,
  verifyRosterChain,
} from "./wire.js";

// This module is the browser participant's whole API (tests/web/pages import it).
export {
  CryptoError, KEEP_EPOCHS, MARK_EVERY, MAX_FORWARD_JUMP, MAX_ROSTER_CANDIDATES, MAX_SKIPPED_KEYS, MAX_UNSIGNED_JUMP,
  MemoryStore, acceptGrant, chainKey, epochCommit, generateIdentity, identityFromSeed, makeDelivery,
  openDelivery,
};
export const MAX_PENDING_GRANTS = 256; // grants held per conversation until its epoch is entered
// Conversations known only from held rosters or grants, or rosters not listing us; past
// it the oldest such state is dropped (`joining_evicted`): an inbox flooded with rosters
// and grants of invented conversations stays bounded.
export const MAX_JOINING = 64;
const FLUSH_MS = 200; // receiving-chain state is written in batches (§6.4)

const rejected = (reason, why) => protocolError(reason, why);

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
    this._updates = new Map(); // cid -> Map(sender pid -> [prekey id, digest] | null) (§6.7)
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
      const pol = policy ?? { signEvery: 1, compress: false, pad: false, requirePq: false };
      const nonce = randomBytes(16);
      const cid = await cidFor(this.pid, nonce);
      const secret = randomBytes(32);
      const roster = await signRoster(this.identity, {
        cid, epoch: 0, nonce, prev: new Uint8Array(0), policy: pol,
        members: this.bundles.members(this.pid, this.identity.edPublic, [this.pid, ...members], new Set([this.pid]), pol),
        issuedAt: Math.floor(Date.now() / 1000), commit: await epochCommit(secret, decodeId(cid), 0),
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
      members: this.bundles.members(this.pid, this.identity.edPublic, pids, admins, policy), policy,
      issuedAt: Math.floor(Date.now() / 1000), commit: await epochCommit(secret, conv.cidRaw, current.epoch + 1),
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
      publications.push(...await payDeliveries(this.bundles, conv));
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

  // Every member's chain 0 from the epoch's secret (§6.1); then our ENDS if due.
  async _keyEpoch(conv, roster, secret) {
    const sending = roster.epoch === conv.epoch && !conv.removed;
    for (const [index, member] of roster.members.entries()) {
      const key = await chainKey(secret, roster.digest, index);
      if (member.pid === this.pid) {
        if (sending && !conv.send) conv.send = { epoch: roster.epoch, chain: 0, step: 0, key };
        continue;
      }
      const id = `${roster.epoch}/${index}/0`;
      if (!conv.recv.has(id)) {
        conv.recv.set(id, new RecvChain({ epoch: roster.epoch, sender: index, chain: 0, step: 0, key, signer: member.key }));
      }
    }
    await this._save(conv);
    if (!sending) return [];
    // New here (not the issuer, not in the epoch before): say we listen now (§6.6).
    const before = conv.rosters.get(roster.epoch - 1);
    const joined = roster.signer !== this.pid && !before?.pids.includes(this.pid);
    const out = joined ? [{ kind: "msg", cid: conv.cid, data: (await this._seal(conv, { kind: MSG.control, op: CONTROL.joined })).data }] : [];
    return [...out, ...await this._endsControl(conv)];
  }

  // Our signed ENDS (§6.5): an epoch we sent in unsigned steps was closed by a removal.
  async _endsControl(conv) {
    const due = conv.sentEnds.filter(([e]) => conv.closed.has(e) && conv.kept(e)?.policy.signEvery !== 1);
    if (!due.length) return [];
    const sealed = await this._seal(conv, { kind: MSG.control, op: CONTROL.ends, ends: due }, true);
    return [{ kind: "msg", cid: conv.cid, data: sealed.data }];
  }

  // Deliveries owed to members whose bundles have arrived since.
  payOwedGrants(cid = null) {
    return this._locked(async () => {
      const out = [];
      for (const conv of cid ? [this._conv(cid)] : [...this.convs.values()]) {
        if (conv.owed.size && conv.epoch >= 0) {
          const before = conv.owed.size;
          out.push(...await payDeliveries(this.bundles, conv));
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
  update() {
    return this._locked(async () => {
      await maintainPrekeys(this.identity, { force: true, dropOld: true });
      await this.store.put("identity", this.identity);
      const out = [{ kind: "bundle", data: this.identity.bundle }];
      const prekey = currentPrekey(this.identity);
      const digest = await sha256(pack(prekeyFields({ id: prekey.id, x25519: prekey.xPublic, mlkem768: null,
                                                      createdAt: prekey.createdAt })));
      for (const conv of [...this.convs.values()].sort((a, b) => (a.cid < b.cid ? -1 : 1))) {
        if (conv.epoch < 0 || conv.removed) continue;
        if (isAdmin(conv.rosters.get(conv.epoch), this.pid)) out.push(...await this._renew(conv));
        else if (conv.send) {
          const sealed = await this._seal(conv, { kind: MSG.control, op: CONTROL.update, prekeyId: prekey.id, prekeyDigest: digest });
          out.push({ kind: "msg", cid: conv.cid, data: sealed.data });
        }
      }
      return out;
    });
  }

  // As an admin: a new epoch for each UPDATE (once we hold the prekey it names) or REKEY.
  answerUpdates() {
    return this._locked(async () => {
      const out = [];
      for (const [cid, asked] of [...this._updates]) {
        const conv = this.convs.get(cid);
        if (!conv || conv.removed || !isAdmin(conv.rosters.get(conv.epoch), this.pid)) { this._updates.delete(cid); continue; }
        const ready = [...asked].filter(([pid, want]) => {
          if (!want) return true;
          const b = this.bundles.get(pid);
          return !!b && b.prekey.id >= want[0];
        }).map(([pid]) => pid);
        if (!ready.length) continue;
        for (const pid of ready) asked.delete(pid);
        if (!asked.size) this._updates.delete(cid);
        out.push(...await this._renew(conv));
      }
      return out;
    });
  }

  // -- deliveries and grants -------------------------------------------------------------------

  // A delivery (§5.3) or a grant (§5.4).
  handleGrant(data) { return this._locked(() => this._handleKey(data)); }

  _handleKey(data) { return isDelivery(data) ? this._handleDelivery(data) : this._handleGrant(data); }

  async _hold(cid, data, conv) { // until its roster is adopted
    conv ??= await this._joining(cid);
    if (conv.pending.length >= MAX_PENDING_GRANTS) throw rejected("grant", "too many deliveries and grants waiting for their roster");
    conv.pending.push(data);
    await this._save(conv);
    return { cid, installed: false, needsRoster: true, ends: 0, publications: [] };
  }

  async _handleDelivery(data) {
    const d = decodeDelivery(data);
    const conv = this.convs.get(d.cid);
    if (!conv || conv.epoch < 0 || d.epoch > conv.epoch) return this._hold(d.cid, data, conv);
    const roster = conv.kept(d.epoch);
    if (!roster) throw rejected("grant", `delivery for epoch ${d.epoch}, which is no longer kept`);
    if (!roster.pids.includes(this.pid)) throw rejected("grant", "delivery for an epoch we are not a member of");
    const secret = await openDelivery(this.identity, d);
    await this.store.put("identity", this.identity); // the prekey's use count (§2.5)
    if (!equal(await epochCommit(secret, conv.cidRaw, d.epoch), roster.commit)) {
      throw rejected("grant", "delivery of another secret than its roster commits to");
    }
    if (conv.keyed(roster, this.pid)) {
      this.count("duplicate");
      return { cid: d.cid, installed: false, needsRoster: false, ends: 0, publications: [] };
    }
    const publications = await this._keyEpoch(conv, roster, secret);
    return { cid: d.cid, installed: true, needsRoster: false, ends: 0, publications };
  }

  async _handleGrant(data) {
    const grant = await decodeGrant(data);
    const payload = await acceptGrant(this.identity, grant);
    await this.store.put("identity", this.identity);
    const conv = this.convs.get(grant.cid);
    if (!conv || conv.epoch < 0 || payload.epoch > conv.epoch) return this._hold(grant.cid, data, conv);
    const roster = conv.kept(payload.epoch);
    if (!roster) throw rejected("grant", `grant for epoch ${payload.epoch}, which is no longer kept`);
    if (payload.chain === 0) throw rejected("grant", "chain 0 comes from the epoch secret, never from a grant");
    if (!equal(roster.digest, payload.roster)) throw rejected("grant", "grant for another roster of this epoch");
    const member = roster.members[payload.sender];
    if (!member) throw rejected("grant", "grant for a sender index outside the roster");
    if (!equal(member.key, grant.granterKey) || member.pid === this.pid) throw rejected("grant", "grant signed by someone other than the chain's member");
    if (!roster.pids.includes(this.pid)) throw rejected("grant", "grant for an epoch we are not a member of");
    const key = `${payload.epoch}/${payload.sender}/${payload.chain}`;
    if (conv.recv.has(key)) {
      this.count("duplicate");
      return { cid: grant.cid, installed: false, needsRoster: false, ends: 0, publications: [] };
    }
    conv.recv.set(key, new RecvChain({ epoch: payload.epoch, sender: payload.sender, chain: payload.chain,
                                       step: payload.step, key: payload.key, signer: member.key }));
    await this._save(conv);
    return { cid: grant.cid, installed: true, needsRoster: false, ends: 0, publications: [] };
  }

  // -- messages --------------------------------------------------------------------------------

  // Encrypt (and per policy sign) a message: {kind, sentAt, text} | {kind, type, ranges} |
  // {kind, op}. The chain's next step is persisted before the envelope exists (§6.3).
  seal(cid, message) {
    return this._locked(async () => this._seal(this._conv(cid), message));
  }

  keyed(cid) { const c = this.convs.get(cid); return !!c && c.epoch >= 0 && !c.removed && !!c.send; }

  async _seal(conv, message, forceSign = false) {
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
    const header = envelopeHeader(kindByte, roster.epoch, sender, chain.chain, step);
    const body = concat(header, await aeadSeal(out.subarray(0, 32), stepNonce(step), data, concat(header, conv.cidRaw)));
    if (!signed) return { data: body, key: [cid, roster.epoch, sender, chain.chain, step] };
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
    const plaintext = await chain.open(h.step, data.subarray(h.headerLength, end),
                                       concat(data.subarray(0, h.headerLength), conv.cidRaw), signed);
    if (plaintext === null) { this.count("duplicate"); return null; }
    this._markDirty(cid);
    const message = await decodePlaintext(h.kind, plaintext,
      { compressed: !!(h.flags & FLAG.compressed), padded: !!(h.flags & FLAG.padded) });
    if (message.kind === MSG.control) await this._onControl(conv, sender, message, signed);
    return { cid, sender, epoch: h.epoch, senderIndex: h.sender, chain: h.chain, step: h.step, message, signed };
  }

  // ENDS, signed only (§6.5); as an admin, UPDATE and REKEY requests (§6.7).
  async _onControl(conv, sender, message, signed) {
    if (message.op === CONTROL.ends) {
      if (signed && conv.learnEnds(sender, message.ends)) await this._save(conv);
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
