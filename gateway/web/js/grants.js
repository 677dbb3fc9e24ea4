// Epoch secrets and grants to prekeys (device/epochs.py, grants.py, sealing.py; PROTOCOL.md
// §5.3-§5.4, §6.1). X25519 only here; the transcript names an ML-KEM prekey as Python's does.

import { concat, decodeId, protocolError, utf8, varint } from "./bytes.js";
import { aeadOpen, aeadSeal, generateEphemeral, hkdf, sha256, x25519 } from "./crypto.js";
import { currentPrekey } from "./identity.js";
import {
  GRANT_MODE, decodeChainGrant, deliveryBytes, deliveryHeader, grantHeader,
} from "./wire.js";

const EPOCH_SALT = utf8("fieldchat epoch v2");
const DELIVERY_LABEL = utf8("fieldchat delivery v2");
const GRANT_LABEL = utf8("fieldchat grant v2");

// The key schedule (§6.1): the roster's commit and each member's chain 0.
export const epochCommit = (secret, cidRaw, epoch) =>
  hkdf(secret, EPOCH_SALT, concat(utf8("commit"), cidRaw, varint(epoch)), 32);
export const chainKey = (secret, rosterDigest, index) =>
  hkdf(secret, EPOCH_SALT, concat(utf8("chain"), rosterDigest, varint(index)), 32);

async function seal(prekey, plaintext, label, header, ephemeral) {
  const eph = ephemeral ?? await generateEphemeral();
  const shared = await x25519(eph.privateKey, prekey.x25519);
  const mode = GRANT_MODE.x25519;
  const th = await sha256(concat(header(mode, eph.publicRaw, null), prekey.x25519,
                                 prekey.mlkem768 ?? new Uint8Array(0)));
  const okm = await hkdf(shared, label, th, 44);
  return { mode, ephemeral: eph.publicRaw, sealed: await aeadSeal(okm.subarray(0, 32), okm.subarray(32), plaintext, th) };
}

async function open(identity, prekeyId, mode, ephemeral, sealed, label, header) {
  const held = identity.prekeys.find((p) => p.id === prekeyId);
  if (!held) throw protocolError("prekey_unknown", `sealed to prekey ${prekeyId}, not held`);
  if (mode !== GRANT_MODE.x25519) throw protocolError("grant", "hybrid seal but this participant has no ML-KEM key");
  const shared = await x25519(held.xPrivate, ephemeral);
  const th = await sha256(concat(header(mode, ephemeral, null), held.xPublic));
  const okm = await hkdf(shared, label, th, 44);
  const plaintext = await aeadOpen(okm.subarray(0, 32), okm.subarray(32), sealed, th);
  held.opens += 1;
  return plaintext;
}

const deliveryHeaderFor = (cidRaw, epoch, prekeyId, recipientPid) => (mode, eph, kem) =>
  concat(deliveryHeader(mode, cidRaw, epoch, prekeyId, eph, kem), decodeId(recipientPid));

// Seal an epoch secret to `recipient`'s current prekey (a decoded bundle).
export async function makeDelivery(secret, recipient, cid, epoch, ephemeral = null) {
  const cidRaw = decodeId(cid);
  const prekey = recipient.prekey;
  const s = await seal(prekey, secret, DELIVERY_LABEL, deliveryHeaderFor(cidRaw, epoch, prekey.id, recipient.pid), ephemeral);
  return deliveryBytes({ mode: s.mode, cidRaw, epoch, prekeyId: prekey.id, ephemeral: s.ephemeral,
                         kemCiphertext: null, sealed: s.sealed });
}

// The epoch secret in a decoded delivery to `identity` (the caller checks the commit).
export async function openDelivery(identity, d) {
  return open(identity, d.prekeyId, d.mode, d.ephemeral, d.sealed, DELIVERY_LABEL,
              deliveryHeaderFor(d.cidRaw, d.epoch, d.prekeyId, identity.pid));
}

const grantHeaderFor = (cid, granterKey, recipient, prekeyId) => (mode, eph, kem) =>
  grantHeader(mode, cid, granterKey, recipient, prekeyId, eph, kem);

export async function acceptGrant(identity, grant) {
  if (grant.recipient !== identity.pid) throw protocolError("grant", "grant addressed to another participant");
  const plaintext = await open(identity, grant.prekeyId, grant.mode, grant.ephemeral, grant.sealed, GRANT_LABEL,
                               grantHeaderFor(grant.cid, grant.granterKey, grant.recipient, grant.prekeyId));
  return decodeChainGrant(plaintext);
}

// Deliveries owed to members whose bundles we have; the secret forgotten once none is (§6.1).
export async function payDeliveries(bundles, conv) {
  if (!conv.grantBase) return [];
  const { epoch, secret } = conv.grantBase;
  const roster = conv.rosters.get(epoch);
  const out = [];
  for (const pid of [...conv.owed].sort()) {
    const bundle = bundles.get(pid);
    if (!bundle || (roster.policy.requirePq && !bundle.postQuantum)) continue;
    out.push({ kind: "grant", recipient: pid, data: await makeDelivery(secret, bundle, conv.cid, epoch) });
    conv.owed.delete(pid);
  }
  if (!conv.owed.size) conv.grantBase = null; // forget the secret (§6.1)
  return out;
}

export { currentPrekey };
