// Keying (device/epochs.py, grants.py, sealing.py, _keying.py; PROTOCOL.md §5.3-§5.4, §6.1,
// §6.6-§6.7): epoch secrets and grants on the wire, sealed to prekeys with the one hybrid KEM
// (crypto.js hybridSeal: X25519 + ML-KEM-768 when the prekey has ML-KEM and so does this
// browser, X25519 only otherwise), and the engine's handling of them and of updates. Loaded
// by engine.js once a conversation needs it, so the page at login stays small.

import {
  LimitExceeded, UnsupportedVersion, WireError, concat, decodeId, encodeId, equal, isValidId, protocolError, utf8,
  varint,
} from "./bytes.js";
import { RecvChain } from "./chains.js";
import { ed25519Verify, hkdf, hybridOpen, hybridSeal, sha256 } from "./crypto.js";
import { currentPrekey, maintainPrekeys } from "./identity.js";
import { fields, pack, unpack } from "./msgpack.js";
import {
  CONTROL, GRANT_MODE, KIND, MAX_CHAIN_ENDS, MLKEM_CT, MSG, U28, VERSION, isAdmin, isBytes, isInt, pidFor, prekeyFields,
  split,
} from "./wire.js";

const rejected = (reason, why) => protocolError(reason, why);

// Deliveries (§5.3): an epoch secret sealed to a prekey, unsigned (the roster commits to it).

// What the hybrid KEM binds a delivery's secret to, before the recipient's pid
// (schemas.delivery.Delivery.context); the combiner adds the keys and the ciphertexts.
export function deliveryContext(mode, cidRaw, epoch, prekeyId) {
  return pack([mode, cidRaw, epoch, prekeyId]);
}

export function deliveryBytes(d) {
  return concat(Uint8Array.of(VERSION, KIND.delivery),
                pack([d.mode, d.cidRaw, d.epoch, d.prekeyId, d.ephemeral, d.kemCiphertext ?? null, d.sealed]));
}

export function decodeDelivery(data) {
  if (!(data instanceof Uint8Array) || !data.length) throw new WireError("empty delivery");
  if (data[0] !== VERSION) throw new UnsupportedVersion(`unsupported delivery version ${data[0]}`);
  if (data.length < 3 || data[1] !== KIND.delivery) throw new WireError("not a delivery");
  const [mode, cidRaw, epoch, prekeyId, ephemeral, kem, sealed] =
    fields(unpack(data.subarray(2), "delivery"), 7, "delivery");
  if ((mode !== 1 && mode !== 2) || !isBytes(cidRaw, 16) || !isInt(epoch, 0, U28) ||
      !isInt(prekeyId, 1, U28) || !isBytes(ephemeral, 32) || !isBytes(sealed, 48)) {
    throw new WireError("invalid delivery");
  }
  if (mode === GRANT_MODE.hybrid ? !isBytes(kem, MLKEM_CT) : kem !== null) {
    throw new WireError("delivery mode and KEM ciphertext disagree");
  }
  return { mode, cidRaw, cid: encodeId(cidRaw), epoch, prekeyId, ephemeral, kemCiphertext: kem, sealed };
}

// Grants (§5.4): a member's own re-keyed chain (chain >= 1), sealed to a prekey, signed.

// What the hybrid KEM binds a grant's key to (schemas.grant.Grant.context).
export function grantContext(mode, cid, granterKey, recipient, prekeyId) {
  return pack([mode, cid, granterKey, recipient, prekeyId]);
}

export async function decodeGrant(data) {
  const { body, signed, signature } = split(data, KIND.grant, 8, "grant");
  const [mode, cid, granterKey, recipient, prekeyId, ephemeral, kem, sealed] = body;
  if ((mode !== 1 && mode !== 2) || !isValidId(cid) || !isBytes(granterKey, 32) ||
      !isValidId(recipient) || !isInt(prekeyId, 1, U28) || !isBytes(ephemeral, 32) ||
      !isBytes(sealed) || sealed.length < 16 || sealed.length > 1024) {
    throw new WireError("invalid grant");
  }
  if (mode === GRANT_MODE.hybrid ? !isBytes(kem, MLKEM_CT) : kem !== null) {
    throw new WireError("grant mode and KEM ciphertext disagree");
  }
  await ed25519Verify(granterKey, signature, signed);
  return { mode, cid, granterKey, recipient, prekeyId, ephemeral, kemCiphertext: kem, sealed, signature,
           granter: await pidFor(granterKey) };
}

// ChainGrant (§5.3): the granter's chain of one epoch from `step`, and where its chains
// of earlier epochs ended (`ends`: [epoch, chain, next step] each, at most MAX_CHAIN_ENDS,
// each of an epoch before the grant's, no (epoch, chain) twice). The 6-element form of
// before the ends is refused: a grant without them could not close an epoch (§6.4).

export function chainGrantBytes(p) {
  return pack([p.epoch, p.roster, p.sender, p.chain, p.step, p.key, (p.ends ?? []).map((e) => [...e])]);
}

export function decodeChainGrant(data) {
  const [epoch, roster, sender, chain, step, key, rawEnds] = fields(unpack(data, "chain grant"), 7, "chain grant");
  if (!isInt(epoch, 0, U28) || !isBytes(roster, 32) || !isInt(sender, 0, U28) ||
      !isInt(chain, 0, U28) || !isInt(step, 0, U28) || !isBytes(key, 32) || !Array.isArray(rawEnds)) {
    throw new WireError("invalid chain grant");
  }
  if (rawEnds.length > MAX_CHAIN_ENDS) throw new LimitExceeded(`a chain grant states at most ${MAX_CHAIN_ENDS} chain ends`);
  const ends = rawEnds.map((raw) => {
    const end = fields(raw, 3, "chain end");
    if (!end.every((n) => isInt(n, 0, U28))) throw new WireError("invalid chain end");
    return end;
  });
  if (ends.some(([e]) => e >= epoch)) throw new WireError("a chain end must name an epoch before the grant's");
  if (new Set(ends.map(([e, c]) => `${e}/${c}`)).size !== ends.length) throw new WireError("a chain end is stated twice");
  return { epoch, roster, sender, chain, step, key, ends };
}


const EPOCH_SALT = utf8("fieldchat epoch v2");
const DELIVERY_LABEL = utf8("fieldchat delivery v2");
const GRANT_LABEL = utf8("fieldchat grant v2");

// The key schedule (§6.1): the roster's commit and each member's chain 0.
export const epochCommit = (secret, cidRaw, epoch) =>
  hkdf(secret, EPOCH_SALT, concat(utf8("commit"), cidRaw, varint(epoch)), 32);
export const chainKey = (secret, rosterDigest, index) =>
  hkdf(secret, EPOCH_SALT, concat(utf8("chain"), rosterDigest, varint(index)), 32);

// Hybrid when the prekey has ML-KEM and this browser can encapsulate (its own prekey has
// ML-KEM, so WebCrypto has it); X25519 only otherwise, which the roster shows (§5.3).
async function seal(identity, prekey, plaintext, label, context, ephemeral) {
  const hybrid = !!prekey.mlkem768 && !!currentPrekey(identity).kPublic;
  const mode = hybrid ? GRANT_MODE.hybrid : GRANT_MODE.x25519;
  const out = await hybridSeal({ x25519Public: prekey.x25519, mlkem768Public: hybrid ? prekey.mlkem768 : null,
                                 context: concat(label, context(mode)), plaintext, ephemeral });
  return { mode, ...out };
}

// `x25519Ok`: an X25519-only seal to our ML-KEM prekey is accepted (its sender has no ML-KEM
// and the roster says so); otherwise it is a downgrade, refused before anything is opened.
async function open(identity, prekeyId, m, label, context, x25519Ok) {
  const held = identity.prekeys.find((p) => p.id === prekeyId);
  if (!held) throw protocolError("prekey_unknown", `sealed to prekey ${prekeyId}, not held`);
  const hybrid = m.mode === GRANT_MODE.hybrid;
  if (hybrid && !held.kPrivate) throw protocolError("grant", "a hybrid seal to a prekey without ML-KEM");
  if (!hybrid && held.kPrivate && !x25519Ok) {
    throw protocolError("grant", "X25519-only seal to a post-quantum prekey (downgrade)");
  }
  const keys = { xPrivate: held.xPrivate, xPublic: held.xPublic, kPrivate: hybrid ? held.kPrivate : null,
                 kPublic: hybrid ? held.kPublic : null };
  const plaintext = await hybridOpen(keys, { ephemeral: m.ephemeral, kemCiphertext: m.kemCiphertext ?? null,
                                             sealed: m.sealed }, concat(label, context(m.mode)));
  held.opens += 1;
  return plaintext;
}

const deliveryContextFor = (cidRaw, epoch, prekeyId, recipientPid) => (mode) =>
  concat(deliveryContext(mode, cidRaw, epoch, prekeyId), decodeId(recipientPid));

// Seal an epoch secret to `recipient`'s current prekey (a decoded bundle).
export async function makeDelivery(identity, secret, recipient, cid, epoch, ephemeral = null) {
  const cidRaw = decodeId(cid);
  const prekey = recipient.prekey;
  const s = await seal(identity, prekey, secret, DELIVERY_LABEL,
                       deliveryContextFor(cidRaw, epoch, prekey.id, recipient.pid), ephemeral);
  return deliveryBytes({ mode: s.mode, cidRaw, epoch, prekeyId: prekey.id, ephemeral: s.ephemeral,
                         kemCiphertext: s.kemCiphertext, sealed: s.sealed });
}

// The epoch secret in a decoded delivery to `identity` (the caller checks the commit).
export async function openDelivery(identity, d, x25519Ok = false) {
  return open(identity, d.prekeyId, d, DELIVERY_LABEL,
              deliveryContextFor(d.cidRaw, d.epoch, d.prekeyId, identity.pid), x25519Ok);
}

export async function acceptGrant(identity, grant, x25519Ok = false) {
  if (grant.recipient !== identity.pid) throw protocolError("grant", "grant addressed to another participant");
  const context = (mode) => grantContext(mode, grant.cid, grant.granterKey, grant.recipient, grant.prekeyId);
  return decodeChainGrant(await open(identity, grant.prekeyId, grant, GRANT_LABEL, context, x25519Ok));
}

// Deliveries owed to members whose bundles we have; the secret forgotten once none is (§6.1).
// In an epoch that requires post-quantum members every delivery is hybrid (§5.2): a member
// without ML-KEM, or this browser without it, stays owed.
export async function payDeliveries(identity, bundles, conv) {
  if (!conv.grantBase) return [];
  const { epoch, secret } = conv.grantBase;
  const roster = conv.rosters.get(epoch);
  const out = [];
  for (const pid of [...conv.owed].sort()) {
    const bundle = bundles.get(pid);
    if (!bundle) continue;
    if (roster.policy.requirePq && !(bundle.postQuantum && currentPrekey(identity).kPublic)) continue;
    out.push({ kind: "grant", recipient: pid, data: await makeDelivery(identity, secret, bundle, conv.cid, epoch) });
    conv.owed.delete(pid);
  }
  if (!conv.owed.size) conv.grantBase = null; // forget the secret (§6.1)
  return out;
}

// Every member's chain 0 from the epoch's secret (§6.1); then our ENDS if due.
export async function keyEpoch(engine, conv, roster, secret) {
  const sending = roster.epoch === conv.epoch && !conv.removed;
  for (const [index, member] of roster.members.entries()) {
    const key = await chainKey(secret, roster.digest, index);
    if (member.pid === engine.pid) {
      if (sending && !conv.send) conv.send = { epoch: roster.epoch, chain: 0, step: 0, key };
      continue;
    }
    const id = `${roster.epoch}/${index}/0`;
    if (!conv.recv.has(id)) {
      conv.recv.set(id, new RecvChain({ epoch: roster.epoch, sender: index, chain: 0, step: 0, key, signer: member.key }));
    }
  }
  await engine._save(conv);
  if (!sending) return [];
  // New here (not the issuer, not in the epoch before): say we listen now (§6.6).
  const before = conv.rosters.get(roster.epoch - 1);
  const joined = roster.signer !== engine.pid && !before?.pids.includes(engine.pid);
  const out = joined ? [{ kind: "msg", cid: conv.cid, data: (await engine._seal(conv, { kind: MSG.control, op: CONTROL.joined })).data }] : [];
  return [...out, ...await endsControl(engine, conv)];
}

// Our signed ENDS (§6.5): an epoch we sent in unsigned steps was closed by a removal.
async function endsControl(engine, conv) {
  const due = conv.sentEnds.filter(([e]) => conv.closed.has(e) && conv.kept(e)?.policy.signEvery !== 1);
  if (!due.length) return [];
  const sealed = await engine._seal(conv, { kind: MSG.control, op: CONTROL.ends, ends: due }, true);
  return [{ kind: "msg", cid: conv.cid, data: sealed.data }];
}

// A new prekey (the old ones deleted) and a new epoch everywhere: ours as an admin,
// asked for with UPDATE elsewhere (§6.7).
export async function update(engine) {
  await maintainPrekeys(engine.identity, { force: true, dropOld: true });
  await engine.store.put("identity", engine.identity);
  const out = [{ kind: "bundle", data: engine.identity.bundle }];
  const prekey = currentPrekey(engine.identity);
  const digest = await sha256(pack(prekeyFields({ id: prekey.id, x25519: prekey.xPublic, mlkem768: prekey.kPublic ?? null,
                                                  createdAt: prekey.createdAt })));
  for (const conv of [...engine.convs.values()].sort((a, b) => (a.cid < b.cid ? -1 : 1))) {
    if (conv.epoch < 0 || conv.removed) continue;
    if (isAdmin(conv.rosters.get(conv.epoch), engine.pid)) out.push(...await engine._renew(conv));
    else if (conv.send) {
      const sealed = await engine._seal(conv, { kind: MSG.control, op: CONTROL.update, prekeyId: prekey.id, prekeyDigest: digest });
      out.push({ kind: "msg", cid: conv.cid, data: sealed.data });
    }
  }
  return out;
}

// As an admin: a new epoch for each UPDATE (once we hold the prekey it names) or REKEY,
// at most one per conversation every UPDATE_EPOCH_EVERY_S: later requests wait (§6.7).
export const UPDATE_EPOCH_EVERY_S = 60;
export async function answerUpdates(engine) {
  const out = [];
  const now = Date.now() / 1000;
  const answered = (engine._updatedAt ??= new Map());
  for (const [cid, asked] of [...engine._updates]) {
    const conv = engine.convs.get(cid);
    if (!conv || conv.removed || !isAdmin(conv.rosters.get(conv.epoch), engine.pid)) { engine._updates.delete(cid); continue; }
    if (now - (answered.get(cid) ?? -Infinity) < UPDATE_EPOCH_EVERY_S) continue;
    const ready = [...asked].filter(([pid, want]) => {
      if (!want) return true;
      const b = engine.bundles.get(pid);
      return !!b && b.prekey.id >= want[0];
    }).map(([pid]) => pid);
    if (!ready.length) continue;
    for (const pid of ready) asked.delete(pid);
    if (!asked.size) engine._updates.delete(cid);
    answered.set(cid, now);
    out.push(...await engine._renew(conv));
  }
  return out;
}

export async function handleDelivery(engine, data) {
  const d = decodeDelivery(data);
  const conv = engine.convs.get(d.cid);
  if (!conv || conv.epoch < 0 || d.epoch > conv.epoch) return engine._hold(d.cid, data, conv);
  const roster = conv.kept(d.epoch);
  if (!roster) throw rejected("grant", `delivery for epoch ${d.epoch}, which is no longer kept`);
  if (!roster.pids.includes(engine.pid)) throw rejected("grant", "delivery for an epoch we are not a member of");
  const secret = await openDelivery(engine.identity, d, engine._x25519Ok(roster, roster.signer));
  await engine.store.put("identity", engine.identity); // the prekey's use count (§2.5)
  if (!equal(await epochCommit(secret, conv.cidRaw, d.epoch), roster.commit)) {
    throw rejected("grant", "delivery of another secret than its roster commits to");
  }
  if (conv.keyed(roster, engine.pid)) {
    engine.count("duplicate");
    return { cid: d.cid, installed: false, needsRoster: false, ends: 0, publications: [] };
  }
  const publications = await keyEpoch(engine, conv, roster, secret);
  return { cid: d.cid, installed: true, needsRoster: false, ends: 0, publications };
}

export async function handleGrant(engine, data) {
  const grant = await decodeGrant(data);
  let conv = engine.convs.get(grant.cid);
  if (!conv || conv.epoch < 0) return engine._hold(grant.cid, data, conv); // opened once a roster lets us in
  // X25519 only is right from a member without ML-KEM (§5.4): the roster says which.
  const payload = await acceptGrant(engine.identity, grant, engine._x25519Ok(conv.rosters.get(conv.epoch), grant.granter));
  await engine.store.put("identity", engine.identity);
  conv = engine.convs.get(grant.cid);
  if (payload.epoch > conv.epoch) return engine._hold(grant.cid, data, conv);
  const roster = conv.kept(payload.epoch);
  if (!roster) throw rejected("grant", `grant for epoch ${payload.epoch}, which is no longer kept`);
  if (payload.chain === 0) throw rejected("grant", "chain 0 comes from the epoch secret, never from a grant");
  if (!equal(roster.digest, payload.roster)) throw rejected("grant", "grant for another roster of this epoch");
  const member = roster.members[payload.sender];
  if (!member) throw rejected("grant", "grant for a sender index outside the roster");
  if (!equal(member.key, grant.granterKey) || member.pid === engine.pid) throw rejected("grant", "grant signed by someone other than the chain's member");
  if (!roster.pids.includes(engine.pid)) throw rejected("grant", "grant for an epoch we are not a member of");
  if (grant.mode !== GRANT_MODE.hybrid && (roster.policy.requirePq || engine.postQuantum) &&
      !engine._x25519Ok(roster, grant.granter)) {
    throw rejected("grant", "X25519-only grant from a post-quantum member or in an epoch that requires post-quantum");
  }
  const key = `${payload.epoch}/${payload.sender}/${payload.chain}`;
  if (conv.recv.has(key)) {
    engine.count("duplicate");
    return { cid: grant.cid, installed: false, needsRoster: false, ends: 0, publications: [] };
  }
  conv.recv.set(key, new RecvChain({ epoch: payload.epoch, sender: payload.sender, chain: payload.chain,
                                     step: payload.step, key: payload.key, signer: member.key }));
  await engine._save(conv);
  return { cid: grant.cid, installed: true, needsRoster: false, ends: 0, publications: [] };
}

