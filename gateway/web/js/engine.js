// The end-to-end engine of a browser participant (device/engine.py in Python; PROTOCOL.md
// §5-§7): conversations, rosters, grants, sending and receiving chains. Pure: no network;
// state goes to an injected store (IndexedDB in the page, memory in the vector checks).
// The browser has no ML-KEM: its bundle says so, the grants it receives and makes are
// X25519-only, and rosters mark it as not post-quantum protected.
//
// Trust in rosters (§5.2): a roster is adopted only through a verified chain, from epoch 0
// when joining and from the newest adopted roster (the tip) when catching up; one that
// does not chain yet waits in a bounded pool (reason `roster_pending`: fetch the rosters
// between) and nothing is granted before its chain is verified. Every adopted roster is
// kept; KEEP_EPOCHS bounds what is opened. Unsigned envelopes of an epoch someone was
// removed after open only below the end their sender stated (§6.4, §7).

import {
  CryptoError, FieldchatError, concat, decodeId, equal, hex, protocolError, utf8,
} from "./bytes.js";
import {
  MARK_EVERY, MAX_FORWARD_JUMP, MAX_SKIPPED_KEYS, MAX_UNSIGNED_JUMP, RecvChain,
} from "./chains.js";
import {
  aeadOpen, aeadSeal, chainStep, ed25519Sign, ed25519Verify, generateEphemeral,
  generateIdentityKeys, hkdf, importPrivate, publicOfPrivate, randomBytes, sha256, stepNonce,
  x25519,
} from "./crypto.js";
import {
  FLAG, GRANT_MODE, MSG, bundleBody, chainGrantBytes, cidFor, decodeBundle, decodeChainGrant,
  decodeGrant, decodePlaintext, decodeRoster, encodePlaintext, envelopeHeader, fingerprint,
  grantBody, grantHeader, isAdmin, isRoster, pidFor, readHeader, rosterBody, verifyRosterChain,
} from "./wire.js";

export { MARK_EVERY, MAX_FORWARD_JUMP, MAX_SKIPPED_KEYS, MAX_UNSIGNED_JUMP };
// Epochs whose envelopes are still opened (receiving chains, chain ends); older rosters
// are kept all the same: joining and catching up need the whole chain.
export const KEEP_EPOCHS = 4;
export const MAX_PENDING_GRANTS = 256; // grants held per conversation until its epoch is entered
// Rosters held per conversation until the epochs between arrive; past it the oldest is
// dropped (counted `roster_pool_evicted`; the gateway has it again).
export const MAX_ROSTER_CANDIDATES = 64;
// Conversations known only from held rosters or grants, or rosters not listing us; past
// it the oldest such state is dropped (`joining_evicted`): an inbox flooded with rosters
// and grants of invented conversations stays bounded.
export const MAX_JOINING = 64;
const FLUSH_MS = 200; // receiving-chain state is written in batches (§6.4)
const GRANT_SALT = utf8("fieldchat grant v1");
const IDENTITY_INFO = utf8("fieldchat identity v1");

const rejected = (reason, why) => protocolError(reason, why);

// A store that keeps everything in memory (vector checks, tests); IndexedDB has the same API.
export class MemoryStore {
  constructor() { this.map = new Map(); }
  async get(key) { return this.map.get(key); }
  async put(key, value) { this.map.set(key, structuredClone(value)); }
  async delete(key) { this.map.delete(key); }
  async entries(prefix) {
    return [...this.map].filter(([k]) => k.startsWith(prefix)).map(([k, v]) => [k, structuredClone(v)]);
  }
}

// Identities --------------------------------------------------------------------------------

async function makeIdentity(keys, createdAt) {
  const body = bundleBody(keys.edPublic, keys.xPublic, null, createdAt);
  const bundle = concat(body, await ed25519Sign(keys.edPrivate, body));
  return { ...keys, createdAt, bundle, pid: await pidFor(keys.edPublic) };
}

// A fresh identity; its private keys are non-extractable CryptoKeys.
export async function generateIdentity(createdAt = Math.floor(Date.now() / 1000)) {
  return makeIdentity(await generateIdentityKeys(), createdAt);
}

// The identity a 32-byte seed derives (PROTOCOL.md §2.1), without its ML-KEM key:
// reproducible identities for the protocol vectors.
export async function identityFromSeed(seed, createdAt) {
  const okm = await hkdf(seed, null, IDENTITY_INFO, 64);
  const ed = okm.slice(0, 32), x = okm.slice(32, 64);
  return makeIdentity({
    edPrivate: await importPrivate("ed25519", ed), edPublic: await publicOfPrivate("ed25519", ed),
    xPrivate: await importPrivate("x25519", x), xPublic: await publicOfPrivate("x25519", x),
  }, createdAt);
}

// Grants (§5.3) ------------------------------------------------------------------------------

async function grantTranscript(mode, cid, granterKey, recipientPid, ephemeral, kem, x25519Pub, mlkem) {
  return sha256(concat(grantHeader(mode, cid, granterKey, recipientPid, ephemeral, kem),
                       x25519Pub, mlkem ?? new Uint8Array(0)));
}

// Seal `payload` to `recipient` (a decoded bundle), X25519 only. The transcript still
// names the recipient's ML-KEM key when it has one, as Python's does.
export async function makeGrant(identity, recipient, cid, payload, ephemeral = null) {
  const eph = ephemeral ?? await generateEphemeral();
  const shared = await x25519(eph.privateKey, recipient.x25519);
  const mode = GRANT_MODE.x25519;
  const th = await grantTranscript(mode, cid, identity.edPublic, recipient.pid, eph.publicRaw, null,
                                   recipient.x25519, recipient.mlkem768);
  const okm = await hkdf(shared, GRANT_SALT, th, 44);
  const sealed = await aeadSeal(okm.subarray(0, 32), okm.subarray(32), chainGrantBytes(payload), th);
  const body = grantBody({ mode, cid, granterKey: identity.edPublic, recipient: recipient.pid,
                           ephemeral: eph.publicRaw, kemCiphertext: null, sealed });
  return concat(body, await ed25519Sign(identity.edPrivate, body));
}

export async function acceptGrant(identity, grant) {
  if (grant.recipient !== identity.pid) throw rejected("grant", "grant addressed to another participant");
  if (grant.mode !== GRANT_MODE.x25519) throw rejected("grant", "hybrid grant but this participant has no ML-KEM key");
  const shared = await x25519(identity.xPrivate, grant.ephemeral);
  const th = await grantTranscript(grant.mode, grant.cid, grant.granterKey, identity.pid,
                                   grant.ephemeral, null, identity.xPublic, null);
  const okm = await hkdf(shared, GRANT_SALT, th, 44);
  return decodeChainGrant(await aeadOpen(okm.subarray(0, 32), okm.subarray(32), grant.sealed, th));
}

// The engine -----------------------------------------------------------------------------------

export class Engine {
  constructor(identity, store) {
    this.identity = identity;
    this.pid = identity.pid;
    this.store = store;
    this.counters = {};
    this.bundles = new Map();
    this.verified = new Set();
    this.convs = new Map();
    this._queue = Promise.resolve();
    this._dirty = new Set();
    this._flushTimer = null;
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
  learnBundle(data) { return this._locked(() => this._learnBundle(data)); }

  async _learnBundle(data) {
    const bundle = await decodeBundle(data);
    const known = this.bundles.get(bundle.pid);
    const fp = await fingerprint(bundle);
    let status;
    if (!known) status = "new";
    else if (equal(known.bytes, bundle.bytes)) return { pid: bundle.pid, status: "same", fingerprint: fp };
    else if (bundle.createdAt <= known.createdAt) {
      return { pid: bundle.pid, status: "older", fingerprint: await fingerprint(known) };
    } else if (!equal(known.x25519, bundle.x25519) || !equal(known.mlkem768 ?? new Uint8Array(0), bundle.mlkem768 ?? new Uint8Array(0))) {
      status = "key_changed";
      this.verified.delete(bundle.pid);
      await this.store.delete(`verified/${bundle.pid}`);
    } else status = "updated";
    this.bundles.set(bundle.pid, bundle);
    await this.store.put(`bundle/${bundle.pid}`, data);
    return { pid: bundle.pid, status, fingerprint: fp,
             previousFingerprint: known ? await fingerprint(known) : null };
  }

  bundleOf(pid) { return pid === this.pid ? null : this.bundles.get(pid) ?? null; }

  async fingerprintOf(pid) {
    if (pid === this.pid) return fingerprint(await decodeBundle(this.identity.bundle));
    const b = this.bundles.get(pid);
    return b ? fingerprint(b) : null;
  }

  markVerified(pid) {
    return this._locked(async () => {
      if (!this.bundles.has(pid)) throw rejected("unknown_participant", `no bundle known for ${pid}`);
      this.verified.add(pid);
      await this.store.put(`verified/${pid}`, true);
    });
  }

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

  _members(pids, admins, policy) {
    return [...new Set(pids)].map((pid) => {
      const bundle = pid === this.pid ? { postQuantum: false } : this.bundles.get(pid);
      if (!bundle) throw rejected("unknown_participant", `no bundle known for ${pid}: fetch it first`);
      if (policy.requirePq && !bundle.postQuantum) throw rejected("not_member", `${pid} has no ML-KEM key`);
      return { pid, admin: admins.has(pid), pq: bundle.postQuantum };
    });
  }

  async _signRoster(fields) {
    const body = rosterBody({ ...fields, signerKey: this.identity.edPublic });
    return decodeRoster(concat(body, await ed25519Sign(this.identity.edPrivate, body)));
  }

  // Found a conversation with us as admin: its cid and what to publish. A new roster goes
  // out as kind "roster": through /ws the gateway, as the verifier, retains it on
  // c/{cid}/roster once it chains (§5.2); a participant never writes that topic itself.
  createConversation(members = [], { policy = null } = {}) {
    return this._locked(async () => {
      const pol = policy ?? { signEvery: 1, compress: false, pad: false, requirePq: false };
      const nonce = randomBytes(16);
      const cid = await cidFor(this.pid, nonce);
      const roster = await this._signRoster({
        cid, epoch: 0, nonce, prev: new Uint8Array(0), policy: pol,
        members: this._members([this.pid, ...members], new Set([this.pid]), pol),
        issuedAt: Math.floor(Date.now() / 1000),
      });
      await verifyRosterChain(roster, null);
      const conv = this._newConv(cid, 0);
      this.convs.set(cid, conv);
      await this._adopt(conv, roster);
      return { cid, publications: [{ kind: "roster", data: roster.bytes }, ...await this._enterEpoch(conv, roster)] };
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

  // A new epoch without `pids`: every remaining member re-keys (§6.1).
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

  // The new roster, then the earlier rosters for each new member's inbox (kind "inbox",
  // one roster each: it must verify the chain from epoch 0 before it trusts the new one,
  // §5.2), then our grants of the new epoch.
  async _rotate(conv, pids, admins, policy) {
    const current = conv.rosters.get(conv.epoch);
    if (conv.removed || !isAdmin(current, this.pid)) {
      throw rejected("not_member", `only an admin of ${conv.cid} can change its roster`);
    }
    if (![...admins].some((a) => pids.includes(a))) admins = new Set([pids.includes(this.pid) ? this.pid : pids[0]]);
    const roster = await this._signRoster({
      cid: conv.cid, epoch: current.epoch + 1, nonce: new Uint8Array(0), prev: current.digest,
      members: this._members(pids, admins, policy), policy, issuedAt: Math.floor(Date.now() / 1000),
    });
    await verifyRosterChain(roster, current);
    const earlier = [...conv.rosters.keys()].sort((a, b) => a - b).map((e) => conv.rosters.get(e).bytes);
    const history = roster.pids.filter((p) => !current.pids.includes(p))
      .flatMap((recipient) => earlier.map((data) => ({ kind: "inbox", recipient, data })));
    await this._adopt(conv, roster);
    return [{ kind: "roster", data: roster.bytes }, ...history, ...await this._enterEpoch(conv, roster)];
  }

  _newConv(cid, epoch) {
    return { cid, cidRaw: decodeId(cid), epoch, tip: -1, rosters: new Map(), kept: [],
             candidates: new Map(), removed: epoch < 0, send: null, grantBase: null, owed: new Set(),
             recv: new Map(), pending: [], closed: new Set(), ends: new Map(), sentEnds: [] };
  }

  // A kept roster (one of the newest KEEP_EPOCHS adopted), or undefined.
  _kept(conv, epoch) { return conv.kept.includes(epoch) ? conv.rosters.get(epoch) : undefined; }

  // What arrived in our inbox: a roster an inviting admin sent (handleRoster's
  // publications) or a grant (handleGrant's result). Kind byte 0x12 is a roster (§5.2).
  handleInbox(data) {
    return this._locked(async () => (isRoster(data)
      ? { roster: true, publications: await this._handleRoster(data) }
      : this._handleGrant(data)));
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
      await this._holdCandidate(conv, roster);
      throw Object.assign(
        rejected("roster_pending", `roster epoch ${roster.epoch} of ${roster.cid} waits for the epochs after ${conv.tip}`),
        { cid: roster.cid, have: conv.tip, want: roster.epoch });
    }
    await verifyRosterChain(roster, conv.rosters.get(conv.tip) ?? null);
    await this._adopt(conv, roster);
    await this._adoptCandidates(conv);
    return this._followTip(conv);
  }

  // State for a conversation not joined yet, dropping the oldest such state past MAX_JOINING.
  async _joining(cid) {
    const joining = [...this.convs.values()].filter((c) => c.epoch < 0);
    if (joining.length >= MAX_JOINING) {
      await this._forget(joining[0]);
      this.count("joining_evicted");
    }
    const conv = this._newConv(cid, -1);
    this.convs.set(cid, conv);
    return conv;
  }

  async _forget(conv) {
    this.convs.delete(conv.cid);
    for (const epoch of conv.rosters.keys()) await this.store.delete(rosterKey(conv.cid, epoch));
    for (const digest of conv.candidates.keys()) await this.store.delete(poolKey(conv.cid, digest));
    await this.store.delete(`conv/${conv.cid}`);
  }

  async _holdCandidate(conv, roster) {
    const digest = hex(roster.digest);
    if (conv.candidates.has(digest)) { this.count("duplicate"); return; }
    if (conv.candidates.size >= MAX_ROSTER_CANDIDATES) {
      const [oldest] = conv.candidates.keys();
      conv.candidates.delete(oldest);
      await this.store.delete(poolKey(conv.cid, oldest));
      this.count("roster_pool_evicted");
    }
    conv.candidates.set(digest, roster);
    await this.store.put(poolKey(conv.cid, digest), roster.bytes);
  }

  // Record a roster whose chain was verified: it becomes the tip. Stored once, apart from
  // the conversation's record (which is written at every seal).
  async _adopt(conv, roster) {
    conv.rosters.set(roster.epoch, roster);
    conv.tip = roster.epoch;
    conv.kept = [...conv.kept, roster.epoch].sort((a, b) => a - b).slice(-KEEP_EPOCHS);
    await this.store.put(rosterKey(conv.cid, roster.epoch), roster.bytes);
  }

  // Adopt held rosters that now chain, epoch after epoch (among several of the next epoch,
  // first one a held roster of the epoch after names as prev); drop those left behind. At
  // most MAX_ROSTER_CANDIDATES chain checks per epoch adopted.
  async _adoptCandidates(conv) {
    while (conv.candidates.size) {
      for (const [digest, r] of [...conv.candidates]) {
        if (r.epoch <= conv.tip) { conv.candidates.delete(digest); await this.store.delete(poolKey(conv.cid, digest)); }
      }
      const held = [...conv.candidates];
      const successors = new Set(held.filter(([, r]) => r.epoch === conv.tip + 2).map(([, r]) => hex(r.prev)));
      const next = held.filter(([, r]) => r.epoch === conv.tip + 1)
        .sort(([a], [b]) => successors.has(b) - successors.has(a));
      const tip = conv.rosters.get(conv.tip) ?? null;
      let chosen = null;
      for (const [digest, r] of next) {
        conv.candidates.delete(digest);
        await this.store.delete(poolKey(conv.cid, digest));
        try {
          await verifyRosterChain(r, tip);
        } catch (err) {
          if (err.reason !== "roster") throw err;
          this.count("roster");
          continue;
        }
        chosen = r;
        break;
      }
      if (!chosen) return;
      await this._adopt(conv, chosen);
    }
  }

  // Enter the newest adopted epoch: at once when we are in the conversation, when joining
  // only once a verified roster lists us.
  async _followTip(conv) {
    if (conv.tip === conv.epoch) return [];
    const tip = conv.rosters.get(conv.tip);
    if (conv.epoch < 0 && !tip.pids.includes(this.pid)) return [];
    return this._enterEpoch(conv, tip);
  }

  // Kept epochs before ours with a member a later roster no longer lists: someone removed
  // since holds their chain keys (a roster we lack counts as a removal).
  _closedEpochs(conv) {
    const out = new Set();
    for (const epoch of conv.kept) {
      const members = conv.rosters.get(epoch).pids;
      for (let later = epoch + 1; later <= conv.epoch; later++) {
        const r = conv.rosters.get(later);
        if (!r || !members.every((p) => r.pids.includes(p))) { out.add(epoch); break; }
      }
    }
    return out;
  }

  // Enter the epoch of an adopted roster: drop what removed members could use, record
  // where our sending chain ended, start a new chain and grant it.
  async _enterEpoch(conv, roster) {
    conv.epoch = roster.epoch;
    const current = new Set(roster.pids);
    for (const [key, chain] of conv.recv) {
      const r = this._kept(conv, chain.epoch);
      if (!r || !current.has(r.pids[chain.sender])) conv.recv.delete(key);
    }
    for (const key of conv.ends.keys()) if (!conv.recv.has(key)) conv.ends.delete(key);
    conv.closed = this._closedEpochs(conv);
    if (conv.send) {
      // Receivers take unsigned envelopes of this chain only below this step once someone
      // was removed (§6.4): every step we sealed is below it (each is persisted first).
      conv.sentEnds = [...conv.sentEnds, [conv.send.epoch, conv.send.chain, conv.send.step]].slice(-KEEP_EPOCHS);
    }
    let publications = [];
    if (!current.has(this.pid)) {
      conv.removed = true;
      conv.send = null;
      conv.grantBase = null;
      conv.owed = new Set();
    } else {
      conv.removed = false;
      const key0 = randomBytes(32);
      conv.send = { epoch: roster.epoch, chain: 0, step: 0, key: key0 };
      conv.grantBase = { step: 0, key: key0 };
      conv.owed = new Set([...current].filter((p) => p !== this.pid));
      publications = await this._payGrants(conv);
    }
    await this._save(conv);
    const pending = conv.pending;
    conv.pending = [];
    for (const data of pending) {
      try { await this._handleGrant(data); } catch (err) {
        if (!(err instanceof FieldchatError)) throw err;
        this.count(err.reason);
      }
    }
    if (pending.length) await this._save(conv);
    return publications;
  }

  async _payGrants(conv) {
    if (!conv.send || !conv.grantBase) return [];
    const roster = conv.rosters.get(conv.epoch);
    const payload = {
      epoch: roster.epoch, roster: roster.digest, sender: roster.pids.indexOf(this.pid),
      chain: conv.send.chain, step: conv.grantBase.step, key: conv.grantBase.key,
      // The ends of the epochs receivers still open (§5.3): at most KEEP_EPOCHS - 1.
      ends: conv.sentEnds.filter(([e]) => e > roster.epoch - KEEP_EPOCHS && e < roster.epoch),
    };
    const out = [];
    for (const pid of [...conv.owed].sort()) {
      const bundle = this.bundles.get(pid);
      if (!bundle) continue;
      out.push({ kind: "grant", recipient: pid, data: await makeGrant(this.identity, bundle, conv.cid, payload) });
      conv.owed.delete(pid);
    }
    if (!conv.owed.size) conv.grantBase = null; // forget the initial chain key (§6.2)
    return out;
  }

  // Grants owed to members whose bundles have arrived since.
  payOwedGrants(cid = null) {
    return this._locked(async () => {
      const out = [];
      for (const conv of cid ? [this._conv(cid)] : [...this.convs.values()]) {
        if (conv.owed.size && conv.epoch >= 0) {
          const before = conv.owed.size;
          out.push(...await this._payGrants(conv));
          if (conv.owed.size !== before) await this._save(conv);
        }
      }
      return out;
    });
  }

  // -- grants ----------------------------------------------------------------------------------

  // `ends`: how many ends of the granter's earlier chains it taught us (envelopes held for
  // them, reason `chain_end_unknown`, can be retried).
  handleGrant(data) { return this._locked(() => this._handleGrant(data)); }

  async _handleGrant(data) {
    const grant = await decodeGrant(data);
    const payload = await acceptGrant(this.identity, grant);
    let conv = this.convs.get(grant.cid);
    if (!conv || conv.epoch < 0 || payload.epoch > conv.epoch) {
      // Not entered yet: held until its roster is adopted through a verified chain.
      conv ??= await this._joining(grant.cid);
      if (conv.pending.length >= MAX_PENDING_GRANTS) throw rejected("grant", "too many grants waiting for their roster");
      conv.pending.push(data);
      await this._save(conv);
      return { cid: grant.cid, installed: false, needsRoster: true, ends: 0 };
    }
    const roster = this._kept(conv, payload.epoch);
    if (!roster) throw rejected("grant", `grant for epoch ${payload.epoch}, which is no longer kept`);
    if (!equal(roster.digest, payload.roster)) throw rejected("grant", "grant for another roster of this epoch");
    const member = roster.members[payload.sender];
    if (!member) throw rejected("grant", "grant for a sender index outside the roster");
    if (member.pid !== grant.granter || member.pid === this.pid) throw rejected("grant", "grant signed by someone other than the chain's member");
    if (!roster.pids.includes(this.pid)) throw rejected("grant", "grant for an epoch we are not a member of");
    const key = `${payload.epoch}/${payload.sender}/${payload.chain}`;
    let installed = false;
    if (conv.recv.has(key)) this.count("duplicate");
    else {
      conv.recv.set(key, new RecvChain({ epoch: payload.epoch, sender: payload.sender, chain: payload.chain,
                                         step: payload.step, key: payload.key, signer: grant.granterKey }));
      installed = true;
    }
    const ends = this._learnEnds(conv, member.pid, payload.ends);
    if (installed || ends) await this._save(conv);
    return { cid: grant.cid, installed, needsRoster: false, ends };
  }

  // Record where the granter's earlier chains ended, for chains we hold (§5.3); a lower
  // end stated again wins: a sender's end only ever refuses more. How many changed.
  _learnEnds(conv, granter, ends) {
    let learned = 0;
    for (const [epoch, chain, nextStep] of ends) {
      const index = this._kept(conv, epoch)?.pids.indexOf(granter) ?? -1;
      const key = `${epoch}/${index}/${chain}`;
      if (index < 0 || !conv.recv.has(key)) continue;
      const known = conv.ends.get(key);
      if (known === undefined || nextStep < known) {
        conv.ends.set(key, nextStep);
        learned++;
      }
    }
    return learned;
  }

  // -- messages --------------------------------------------------------------------------------

  // Encrypt (and per policy sign) a message: {kind, sentAt, text} | {kind, type, ranges} |
  // {kind, op}. The chain's next step is persisted before the envelope exists (§6.3).
  seal(cid, message) {
    return this._locked(async () => {
      const conv = this._conv(cid);
      const chain = conv.send;
      if (!chain || conv.removed) throw rejected("not_member", `not a member of ${cid}`);
      const roster = conv.rosters.get(conv.epoch);
      const { data, compressed, padded } = await encodePlaintext(message, roster.policy);
      const step = chain.step;
      const out = chainStep(chain.key);
      chain.step = step + 1;
      chain.key = out.slice(32);
      await this._save(conv);
      const every = roster.policy.signEvery;
      const signed = every !== 0 && step % every === 0;
      const kindByte = message.kind | (signed ? FLAG.signed : 0) | (compressed ? FLAG.compressed : 0) |
                       (padded ? FLAG.padded : 0);
      const sender = roster.pids.indexOf(this.pid);
      const header = envelopeHeader(kindByte, roster.epoch, sender, chain.chain, step);
      const body = concat(header, await aeadSeal(out.subarray(0, 32), stepNonce(step), data, concat(header, conv.cidRaw)));
      if (!signed) return { data: body, key: [cid, roster.epoch, sender, chain.chain, step] };
      const sig = await ed25519Sign(this.identity.edPrivate, concat(body, conv.cidRaw));
      return { data: concat(body, sig), key: [cid, roster.epoch, sender, chain.chain, step] };
    });
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
    const roster = this._kept(conv, h.epoch);
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
    return { cid, sender, epoch: h.epoch, senderIndex: h.sender, chain: h.chain, step: h.step, message, signed };
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

  // The conversation's record; rosters (rosterKey) and held ones (poolKey) are stored
  // apart, once each.
  async _save(conv) {
    this._dirty.delete(conv.cid);
    await this.store.put(`conv/${conv.cid}`, {
      cid: conv.cid, epoch: conv.epoch, removed: conv.removed,
      send: conv.send, grantBase: conv.grantBase, owed: [...conv.owed],
      recv: [...conv.recv.values()].map((c) => c.record), pending: conv.pending,
      ends: [...conv.ends], sentEnds: conv.sentEnds,
    });
  }

  async _load() {
    for (const [, data] of await this.store.entries("bundle/")) {
      const b = await decodeBundle(data);
      this.bundles.set(b.pid, b);
    }
    for (const [key] of await this.store.entries("verified/")) this.verified.add(key.slice(9));
    const held = (cid) => this.convs.get(cid) ?? this.convs.set(cid, this._newConv(cid, -1)).get(cid);
    const records = await this.store.entries("conv/");
    for (const [, rec] of records) {
      const conv = this._newConv(rec.cid, rec.epoch);
      Object.assign(conv, { removed: rec.removed, send: rec.send, grantBase: rec.grantBase,
                            owed: new Set(rec.owed), pending: rec.pending,
                            ends: new Map(rec.ends ?? []), sentEnds: rec.sentEnds ?? [] });
      this.convs.set(conv.cid, conv);
      // Written before rosters were stored apart: the newest KEEP_EPOCHS, adopted then.
      for (const bytes of rec.rosters ?? []) {
        const r = await decodeRoster(bytes);
        await this.store.put(rosterKey(r.cid, r.epoch), bytes);
        conv.rosters.set(r.epoch, r);
      }
    }
    for (const [, bytes] of await this.store.entries("roster/")) {
      const r = await decodeRoster(bytes);
      held(r.cid).rosters.set(r.epoch, r);
    }
    for (const [, bytes] of await this.store.entries(POOL)) {
      const r = await decodeRoster(bytes);
      held(r.cid).candidates.set(hex(r.digest), r);
    }
    for (const conv of this.convs.values()) {
      const epochs = [...conv.rosters.keys()].sort((a, b) => a - b);
      conv.tip = epochs.length ? epochs[epochs.length - 1] : -1;
      conv.kept = epochs.slice(-KEEP_EPOCHS);
      if (conv.epoch >= 0 && !conv.rosters.has(conv.epoch)) conv.epoch = -1; // nothing to enter
    }
    for (const [, rec] of records) {
      const conv = this.convs.get(rec.cid);
      for (const c of rec.recv) if (this._kept(conv, c.epoch)) conv.recv.set(`${c.epoch}/${c.sender}/${c.chain}`, new RecvChain(c));
      if (rec.rosters) await this._save(conv); // now without them
      if (conv.epoch >= 0) conv.closed = this._closedEpochs(conv);
    }
  }
}

const POOL = "rosterpool/";
const rosterKey = (cid, epoch) => `roster/${cid}/${String(epoch).padStart(8, "0")}`;
const poolKey = (cid, digest) => `${POOL}${cid}/${digest.slice(0, 32)}`;

export { CryptoError };
