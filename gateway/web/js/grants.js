// Grants (device/grants.py; PROTOCOL.md §5.3): a chain grant sealed to one member's
// bundle, X25519 only (the browser has no ML-KEM), and opened with our X25519 key.

import { concat, protocolError, utf8 } from "./bytes.js";
import { KEEP_EPOCHS } from "./conversation.js";
import { aeadOpen, aeadSeal, ed25519Sign, generateEphemeral, hkdf, sha256, x25519 } from "./crypto.js";
import { GRANT_MODE, chainGrantBytes, decodeChainGrant, grantBody, grantHeader } from "./wire.js";

const GRANT_SALT = utf8("fieldchat grant v1");

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
  if (grant.recipient !== identity.pid) throw protocolError("grant", "grant addressed to another participant");
  if (grant.mode !== GRANT_MODE.x25519) throw protocolError("grant", "hybrid grant but this participant has no ML-KEM key");
  const shared = await x25519(identity.xPrivate, grant.ephemeral);
  const th = await grantTranscript(grant.mode, grant.cid, grant.granterKey, identity.pid,
                                   grant.ephemeral, null, identity.xPublic, null);
  const okm = await hkdf(shared, GRANT_SALT, th, 44);
  return decodeChainGrant(await aeadOpen(okm.subarray(0, 32), okm.subarray(32), grant.sealed, th));
}

// Our grants of the conversation's current epoch owed to members whose bundles we have
// (each is then no longer owed); once none is owed the initial chain key is forgotten (§6.2).
export async function payGrants(identity, bundles, conv) {
  if (!conv.send || !conv.grantBase) return [];
  const roster = conv.rosters.get(conv.epoch);
  const payload = {
    epoch: roster.epoch, roster: roster.digest, sender: roster.pids.indexOf(identity.pid),
    chain: conv.send.chain, step: conv.grantBase.step, key: conv.grantBase.key,
    // The ends of the epochs receivers still open (§5.3): at most KEEP_EPOCHS - 1.
    ends: conv.sentEnds.filter(([e]) => e > roster.epoch - KEEP_EPOCHS && e < roster.epoch),
  };
  const out = [];
  for (const pid of [...conv.owed].sort()) {
    const bundle = bundles.get(pid);
    if (!bundle) continue;
    out.push({ kind: "grant", recipient: pid, data: await makeGrant(identity, bundle, conv.cid, payload) });
    conv.owed.delete(pid);
  }
  if (!conv.owed.size) conv.grantBase = null; // forget the initial chain key (§6.2)
  return out;
}
