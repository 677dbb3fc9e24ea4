// The end-to-end engine of a browser participant (device/engine.py in Python; PROTOCOL.md
// §5-§7): conversations, rosters, grants, sending and receiving chains. Pure: no network;
// state goes to an injected store (IndexedDB in the page, memory in the vector checks).
// The browser has no ML-KEM: its bundle says so, the grants it receives and makes are
// X25519-only, and rosters mark it as not post-quantum protected.

import {
  CryptoError, FieldchatError, concat, decodeId, equal, protocolError,
} from "./bytes.js";
import {
  aeadOpen, aeadSeal, chainStep, ed25519Sign, ed25519Verify, generateEphemeral,
  generateIdentityKeys, hkdf, importPrivate, publicOfPrivate, randomBytes, sha256, stepNonce,
  x25519,
} from "./crypto.js";
import {
  FLAG, GRANT_MODE, MSG, bundleBody, chainGrantBytes, cidFor, decodeBundle, decodeChainGrant,
  decodeGrant, decodePlaintext, decodeRoster, encodePlaintext, envelopeHeader, fingerprint,
  grantBody, grantHeader, isAdmin, pidFor, readHeader, rosterBody, verifyRosterChain,
} from "./wire.js";
import { utf8 } from "./bytes.js";

export const MAX_SKIPPED_KEYS = 2000; // per receiving chain, as libsignal
export const MAX_FORWARD_JUMP = 25000;
export const KEEP_EPOCHS = 4;
export const MAX_PENDING_GRANTS = 256;
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

// Receiving chains (§6.4) --------------------------------------------------------------------

async function chainOpen(chain, step, sealed, aad) {
  if (step === chain.step) {
    const out = await chainStep(chain.key);
    const plaintext = await aeadOpen(out.subarray(0, 32), stepNonce(step), sealed, aad);
    chain.key = out.slice(32);
    chain.step = step + 1;
    return plaintext;
  }
  if (step > chain.step) {
    const jump = step - chain.step;
    if (jump > MAX_FORWARD_JUMP) throw rejected("forward_jump", `step ${step} is ${jump} ahead`);
    const passed = [];
    let ck = chain.key;
    for (let s = chain.step; s < step; s++) {
      passed.push([s, ck]);
      ck = (await chainStep(ck)).slice(32);
    }
    const out = await chainStep(ck);
    const plaintext = await aeadOpen(out.subarray(0, 32), stepNonce(step), sealed, aad);
    // State moves only now that AES-GCM has authenticated the envelope.
    const keep = passed.slice(-MAX_SKIPPED_KEYS);
    if (passed.length > MAX_SKIPPED_KEYS) {
      chain.evicted = Math.max(chain.evicted, passed[passed.length - MAX_SKIPPED_KEYS - 1][0]);
    }
    for (const [s, k] of keep) chain.skipped.set(s, k);
    while (chain.skipped.size > MAX_SKIPPED_KEYS) {
      const [oldest] = chain.skipped.keys();
      chain.skipped.delete(oldest);
      chain.evicted = Math.max(chain.evicted, oldest);
    }
    chain.key = out.slice(32);
    chain.step = step + 1;
    return plaintext;
  }
  const key = chain.skipped.get(step);
  if (!key) {
    if (step <= chain.evicted) throw rejected("old_step", `step ${step} is older than the window`);
    return null; // a duplicate
  }
  const plaintext = await aeadOpen((await chainStep(key)).subarray(0, 32), stepNonce(step), sealed, aad);
  chain.skipped.delete(step);
  return plaintext;
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

  // Found a conversation with us as admin: its cid and what to publish.
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
      return { cid, publications: [{ kind: "roster", data: roster.bytes }, ...await this._enterEpoch(conv, roster)] };
    });
  }

  addMembers(cid, pids) {
    return this._locked(async () => {
      const conv = this._conv(cid);
      const current = conv.rosters.get(conv.epoch);
      const all = [...current.members.map((m) => m.pid), ...pids];
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
      const keep = current.members.map((m) => m.pid).filter((p) => !drop.has(p));
      const admins = new Set(current.members.filter((m) => m.admin && !drop.has(m.pid)).map((m) => m.pid));
      return this._rotate(conv, keep, admins, current.policy);
    });
  }

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
    return [{ kind: "roster", data: roster.bytes }, ...await this._enterEpoch(conv, roster)];
  }

  _newConv(cid, epoch) {
    return { cid, cidRaw: decodeId(cid), epoch, rosters: new Map(), removed: false, send: null,
             grantBase: null, owed: new Set(), recv: new Map(), pending: [] };
  }

  // Accept a roster; return our grants for its epoch.
  handleRoster(data) { return this._locked(() => this._handleRoster(data)); }

  async _handleRoster(data) {
    const roster = await decodeRoster(data);
    let conv = this.convs.get(roster.cid);
    if (!conv || !conv.rosters.size) {
      if (!roster.members.some((m) => m.pid === this.pid)) throw rejected("not_member", `not a member of ${roster.cid}`);
      if (roster.epoch === 0) await verifyRosterChain(roster, null);
      // Joining later: the first roster that lists us is the base (PROTOCOL.md §5.2).
      const pending = conv ? conv.pending : [];
      conv = this._newConv(roster.cid, roster.epoch);
      conv.pending = pending;
      this.convs.set(roster.cid, conv);
      return this._enterEpoch(conv, roster);
    }
    if (roster.epoch <= conv.epoch) {
      const known = conv.rosters.get(roster.epoch);
      if (known && equal(known.digest, roster.digest)) { this.count("duplicate"); return []; }
      throw rejected("roster", `roster epoch ${roster.epoch} is not newer than ${conv.epoch}`);
    }
    if (roster.epoch === conv.epoch + 1) await verifyRosterChain(roster, conv.rosters.get(conv.epoch));
    else if (!isAdmin(conv.rosters.get(conv.epoch), roster.signer)) {
      throw rejected("roster", `roster epoch ${roster.epoch} skips epochs and its signer is unknown`);
    }
    return this._enterEpoch(conv, roster);
  }

  async _enterEpoch(conv, roster) {
    conv.rosters.set(roster.epoch, roster);
    conv.epoch = roster.epoch;
    for (const old of [...conv.rosters.keys()].sort((a, b) => a - b).slice(0, -KEEP_EPOCHS)) conv.rosters.delete(old);
    const current = new Set(roster.members.map((m) => m.pid));
    for (const [key, chain] of conv.recv) {
      const r = conv.rosters.get(chain.epoch);
      if (!r || !current.has(r.members[chain.sender]?.pid)) conv.recv.delete(key);
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
      epoch: roster.epoch, roster: roster.digest,
      sender: roster.members.findIndex((m) => m.pid === this.pid), chain: conv.send.chain,
      step: conv.grantBase.step, key: conv.grantBase.key,
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

  handleGrant(data) { return this._locked(() => this._handleGrant(data)); }

  async _handleGrant(data) {
    const grant = await decodeGrant(data);
    const payload = await acceptGrant(this.identity, grant);
    let conv = this.convs.get(grant.cid);
    const roster = conv ? conv.rosters.get(payload.epoch) : undefined;
    if (!roster) {
      if (!conv || payload.epoch > conv.epoch) {
        if (!conv) {
          conv = this._newConv(grant.cid, -1);
          conv.removed = true;
          this.convs.set(grant.cid, conv);
        }
        if (conv.pending.length >= MAX_PENDING_GRANTS) throw rejected("grant", "too many grants waiting for their roster");
        conv.pending.push(data);
        await this._save(conv);
        return { cid: grant.cid, installed: false, needsRoster: true };
      }
      throw rejected("grant", `grant for epoch ${payload.epoch}, which is no longer kept`);
    }
    if (!equal(roster.digest, payload.roster)) throw rejected("grant", "grant for another roster of this epoch");
    const member = roster.members[payload.sender];
    if (!member) throw rejected("grant", "grant for a sender index outside the roster");
    if (member.pid !== grant.granter || member.pid === this.pid) throw rejected("grant", "grant signed by someone other than the chain's member");
    if (!roster.members.some((m) => m.pid === this.pid)) throw rejected("grant", "grant for an epoch we are not a member of");
    const key = `${payload.epoch}/${payload.sender}/${payload.chain}`;
    if (conv.recv.has(key)) { this.count("duplicate"); return { cid: grant.cid, installed: false }; }
    conv.recv.set(key, { epoch: payload.epoch, sender: payload.sender, chain: payload.chain,
                         step: payload.step, key: payload.key, signer: grant.granterKey,
                         skipped: new Map(), evicted: -1 });
    await this._save(conv);
    return { cid: grant.cid, installed: true };
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
      const out = await chainStep(chain.key);
      chain.step = step + 1;
      chain.key = out.slice(32);
      await this._save(conv);
      const every = roster.policy.signEvery;
      const signed = every !== 0 && step % every === 0;
      const kindByte = message.kind | (signed ? FLAG.signed : 0) | (compressed ? FLAG.compressed : 0) |
                       (padded ? FLAG.padded : 0);
      const sender = roster.members.findIndex((m) => m.pid === this.pid);
      const header = envelopeHeader(kindByte, roster.epoch, sender, chain.chain, step);
      const body = concat(header, await aeadSeal(out.subarray(0, 32), stepNonce(step), data, concat(header, conv.cidRaw)));
      if (!signed) return { data: body, key: [cid, roster.epoch, sender, chain.chain, step] };
      const sig = await ed25519Sign(this.identity.edPrivate, concat(body, conv.cidRaw));
      return { data: concat(body, sig), key: [cid, roster.epoch, sender, chain.chain, step] };
    });
  }

  // Authenticate and decrypt; null for a duplicate or our own envelope (see `own`).
  open(cid, data) { return this._locked(() => this._open(cid, data)); }

  async _open(cid, data) {
    const conv = this.convs.get(cid);
    if (!conv || conv.epoch < 0) throw rejected("unknown_conversation", `unknown conversation ${String(cid).slice(0, 40)}`);
    const h = readHeader(data);
    const roster = conv.rosters.get(h.epoch);
    if (!roster) {
      if (h.epoch > conv.epoch) throw rejected("missing_key", `roster of epoch ${h.epoch} not known yet`);
      throw rejected("stale_epoch", `epoch ${h.epoch} is no longer kept`);
    }
    if (conv.removed && h.epoch >= conv.epoch) throw rejected("not_member", `removed from ${cid}`);
    const member = roster.members[h.sender];
    if (!member) throw rejected("not_member", `no member ${h.sender} at epoch ${h.epoch}`);
    if (member.pid === this.pid) { this.count("own"); return null; }
    const current = conv.rosters.get(conv.epoch);
    if (h.epoch < conv.epoch && (conv.removed || !current.members.some((m) => m.pid === member.pid))) {
      throw rejected("stale_epoch", `${member.pid} was removed after epoch ${h.epoch}`);
    }
    const chain = conv.recv.get(`${h.epoch}/${h.sender}/${h.chain}`);
    if (!chain) throw rejected("missing_key", `no grant yet for ${member.pid} in epoch ${h.epoch}`);
    let end = data.length;
    if (h.flags & FLAG.signed) {
      end -= 64;
      await ed25519Verify(chain.signer, data.subarray(end), concat(data.subarray(0, end), conv.cidRaw));
    } else if (roster.policy.signEvery && h.step % roster.policy.signEvery === 0) {
      throw rejected("unsigned", "the conversation policy requires a signature");
    }
    const plaintext = await chainOpen(chain, h.step, data.subarray(h.headerLength, end),
                                      concat(data.subarray(0, h.headerLength), conv.cidRaw));
    if (plaintext === null) { this.count("duplicate"); return null; }
    this._markDirty(cid);
    const message = await decodePlaintext(h.kind, plaintext,
      { compressed: !!(h.flags & FLAG.compressed), padded: !!(h.flags & FLAG.padded) });
    return { cid, sender: member.pid, epoch: h.epoch, senderIndex: h.sender, chain: h.chain,
             step: h.step, message, signed: !!(h.flags & FLAG.signed) };
  }

  // Which participant sent an envelope (own ones included), without decrypting it.
  senderOf(cid, data) {
    const conv = this.convs.get(cid);
    if (!conv) return null;
    const h = readHeader(data);
    return conv.rosters.get(h.epoch)?.members[h.sender]?.pid ?? null;
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
    await this.store.put(`conv/${conv.cid}`, {
      cid: conv.cid, epoch: conv.epoch, removed: conv.removed,
      rosters: [...conv.rosters.values()].map((r) => r.bytes),
      send: conv.send, grantBase: conv.grantBase, owed: [...conv.owed],
      recv: [...conv.recv.values()], pending: conv.pending,
    });
  }

  async _load() {
    for (const [, data] of await this.store.entries("bundle/")) {
      const b = await decodeBundle(data);
      this.bundles.set(b.pid, b);
    }
    for (const [key] of await this.store.entries("verified/")) this.verified.add(key.slice(9));
    for (const [, rec] of await this.store.entries("conv/")) {
      const conv = this._newConv(rec.cid, rec.epoch);
      for (const bytes of rec.rosters) {
        const r = await decodeRoster(bytes);
        conv.rosters.set(r.epoch, r);
      }
      Object.assign(conv, { removed: rec.removed, send: rec.send, grantBase: rec.grantBase,
                            owed: new Set(rec.owed), pending: rec.pending });
      for (const c of rec.recv) conv.recv.set(`${c.epoch}/${c.sender}/${c.chain}`, c);
      this.convs.set(conv.cid, conv);
    }
  }
}

export { CryptoError };
