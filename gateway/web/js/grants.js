// Grants (device/grants.py; PROTOCOL.md §5.3): a chain grant sealed to one member's bundle
// with the hybrid KEM (crypto.js hybridSeal: X25519 + ML-KEM-768 when the recipient has
// ML-KEM and so does this browser, X25519 only otherwise), and opened with our keys.

import { concat, protocolError } from "./bytes.js";
import { KEEP_EPOCHS } from "./conversation.js";
import { ed25519Sign, hybridOpen, hybridSeal } from "./crypto.js";
import { GRANT_MODE, chainGrantBytes, decodeChainGrant, grantBody, grantContext } from "./wire.js";

// Seal `payload` to `recipient` (a decoded bundle): hybrid when it has an ML-KEM key and we
// can encapsulate (our identity has one, so this browser has WebCrypto ML-KEM).
export async function makeGrant(identity, recipient, cid, payload, ephemeral = null) {
  const hybrid = !!recipient.mlkem768 && !!identity.kPublic;
  const mode = hybrid ? GRANT_MODE.hybrid : GRANT_MODE.x25519;
  const out = await hybridSeal({
    x25519Public: recipient.x25519, mlkem768Public: hybrid ? recipient.mlkem768 : null,
    context: grantContext(mode, cid, identity.edPublic, recipient.pid), plaintext: chainGrantBytes(payload), ephemeral,
  });
  const body = grantBody({ mode, cid, granterKey: identity.edPublic, recipient: recipient.pid,
                           ephemeral: out.ephemeral, kemCiphertext: out.kemCiphertext, sealed: out.sealed });
  return concat(body, await ed25519Sign(identity.edPrivate, body));
}

export async function acceptGrant(identity, grant) {
  if (grant.recipient !== identity.pid) throw protocolError("grant", "grant addressed to another participant");
  if (grant.mode === GRANT_MODE.hybrid && !identity.kPrivate) {
    throw protocolError("grant", "hybrid grant but this participant has no ML-KEM key");
  }
  const plaintext = await hybridOpen(identity, grant, grantContext(grant.mode, grant.cid, grant.granterKey, grant.recipient));
  return decodeChainGrant(plaintext);
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
    // Every grant of an epoch that requires post-quantum members is hybrid (§5.2): a
    // member without ML-KEM, or this browser without it, stays owed.
    if (roster.policy.requirePq && !(bundle.mlkem768 && identity.kPublic)) continue;
    out.push({ kind: "grant", recipient: pid, data: await makeGrant(identity, bundle, conv.cid, payload) });
    conv.owed.delete(pid);
  }
  if (!conv.owed.size) conv.grantBase = null; // forget the initial chain key (§6.2)
  return out;
}
