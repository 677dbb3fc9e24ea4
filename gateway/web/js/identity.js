// A browser participant's identity (device/identity.py; PROTOCOL.md §2): an Ed25519 key and
// its rotating prekeys, and the signed bundle that publishes the current prekey. The browser
// has no ML-KEM yet: its prekeys carry nil, so rosters mark it as not post-quantum protected.
// Prekeys are drawn fresh (never derived from a seed) and rotate by time and by use; an old
// one's private key is deleted after its grace period (§2.5). The roster an admin issues is
// signed here too.

import { concat, utf8 } from "./bytes.js";
import { ed25519Sign, generateEdKeys, generateXKeys, hkdf, importPrivate, publicOfPrivate } from "./crypto.js";
import { bundleBody, decodeRoster, pidFor, rosterBody } from "./wire.js";

const IDENTITY_INFO = utf8("fieldchat identity v2");
// device/identity.py: a week, 64 opens, a week of grace, three old prekeys at most.
export const PREKEY_ROTATE_S = 7 * 86400;
export const PREKEY_MAX_OPENS = 64;
export const PREKEY_GRACE_S = 7 * 86400;
export const MAX_OLD_PREKEYS = 3;

const now = () => Math.floor(Date.now() / 1000);

async function signBundle(identity) {
  const current = identity.prekeys[identity.prekeys.length - 1];
  const prekey = { id: current.id, x25519: current.xPublic, mlkem768: null, createdAt: current.createdAt };
  const body = bundleBody(identity.edPublic, identity.createdAt, prekey);
  identity.bundle = concat(body, await ed25519Sign(identity.edPrivate, body));
  return identity;
}

async function drawPrekey(id, createdAt) {
  const x = await generateXKeys();
  return { id, xPrivate: x.privateKey, xPublic: x.publicRaw, createdAt, supersededAt: null, opens: 0 };
}

// A fresh identity; its private keys are non-extractable CryptoKeys.
export async function generateIdentity(createdAt = now()) {
  const ed = await generateEdKeys();
  const identity = { edPrivate: ed.privateKey, edPublic: ed.publicRaw, createdAt,
                     prekeys: [await drawPrekey(1, createdAt)], pid: await pidFor(ed.publicRaw) };
  return signBundle(identity);
}

// The identity a 32-byte seed derives (PROTOCOL.md §2.1) with a given first prekey (its
// raw X25519 private key): reproducible identities for the protocol vectors.
export async function identityFromSeed(seed, createdAt, prekeyPrivate, prekeyId = 1) {
  const ed = (await hkdf(seed, null, IDENTITY_INFO, 32)).slice(0, 32);
  const edPublic = await publicOfPrivate("ed25519", ed);
  const prekey = { id: prekeyId, xPrivate: await importPrivate("x25519", prekeyPrivate),
                   xPublic: await publicOfPrivate("x25519", prekeyPrivate), createdAt,
                   supersededAt: null, opens: 0 };
  return signBundle({ edPrivate: await importPrivate("ed25519", ed), edPublic, createdAt,
                      prekeys: [prekey], pid: await pidFor(edPublic) });
}

export const currentPrekey = (identity) => identity.prekeys[identity.prekeys.length - 1];

// Rotate when due (by time or use) and delete prekeys past their grace; whether the bundle
// changed (then publish it). `dropOld` (an update, §6.7): delete every older prekey now.
export async function maintainPrekeys(identity, { at = now(), force = false, dropOld = false } = {}) {
  const current = currentPrekey(identity);
  const due = force || at - current.createdAt >= PREKEY_ROTATE_S || current.opens >= PREKEY_MAX_OPENS;
  if (due) {
    current.supersededAt = at;
    const fresh = await drawPrekey(current.id + 1, at);
    identity.prekeys = dropOld ? [fresh] : [...identity.prekeys, fresh];
  }
  const old = identity.prekeys.slice(0, -1)
    .filter((p) => p.supersededAt !== null && at - p.supersededAt < PREKEY_GRACE_S).slice(-MAX_OLD_PREKEYS);
  const pruned = old.length !== identity.prekeys.length - 1;
  identity.prekeys = [...old, currentPrekey(identity)];
  if (due) await signBundle(identity);
  return { rotated: due, pruned };
}

// A roster with `fields`, signed by `identity` as its issuer (§5.1).
export async function signRoster(identity, fields) {
  const body = rosterBody({ ...fields, signerKey: identity.edPublic });
  return decodeRoster(concat(body, await ed25519Sign(identity.edPrivate, body)));
}
