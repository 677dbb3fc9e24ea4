// A browser participant's identity (device/identity.py; PROTOCOL.md §2): an Ed25519 key, its
// rotating prekeys (drawn, never derived: X25519 and, where WebCrypto has it, ML-KEM-768;
// private halves non-extractable CryptoKeys, kept in IndexedDB as they are) and the bundle;
// rosters signed here. Without ML-KEM the prekey carries nil: rosters mark the browser as
// X25519 only, and a conversation that requires post-quantum members cannot list it.

import { concat, utf8 } from "./bytes.js";
import {
  ed25519Sign, generateEdKeys, generateKemKeys, generateXKeys, hkdf, importMlkemSeed, importPrivate, publicOfPrivate,
} from "./crypto.js";
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
  const prekey = { id: current.id, x25519: current.xPublic, mlkem768: current.kPublic ?? null,
                   createdAt: current.createdAt };
  const body = bundleBody(identity.edPublic, current.createdAt, prekey); // its time: the prekey's
  identity.bundle = concat(body, await ed25519Sign(identity.edPrivate, body));
  identity.postQuantum = !!current.kPublic;
  return identity;
}

async function drawPrekey(id, createdAt) {
  const x = await generateXKeys();
  return { id, xPrivate: x.privateKey, xPublic: x.publicRaw, ...await generateKemKeys(), createdAt,
           supersededAt: null, opens: 0 };
}

// A fresh identity; its private keys are non-extractable CryptoKeys.
export async function generateIdentity(createdAt = now()) {
  const ed = await generateEdKeys();
  const identity = { edPrivate: ed.privateKey, edPublic: ed.publicRaw, createdAt,
                     prekeys: [await drawPrekey(1, createdAt)], pid: await pidFor(ed.publicRaw) };
  return signBundle(identity);
}

// The identity of a seed (§2.1) with a given first prekey (its X25519 private key and, for
// a post-quantum one, its 64-byte ML-KEM-768 seed d || z): the protocol vectors.
export async function identityFromSeed(seed, createdAt, prekeyPrivate, { prekeyId = 1, mlkemSeed = null } = {}) {
  const ed = (await hkdf(seed, null, IDENTITY_INFO, 32)).slice(0, 32);
  const edPublic = await publicOfPrivate("ed25519", ed);
  const kem = mlkemSeed ? await importMlkemSeed(mlkemSeed) : { kPrivate: null, kPublic: null };
  const prekey = { id: prekeyId, xPrivate: await importPrivate("x25519", prekeyPrivate),
                   xPublic: await publicOfPrivate("x25519", prekeyPrivate), ...kem, createdAt,
                   supersededAt: null, opens: 0 };
  return signBundle({ edPrivate: await importPrivate("ed25519", ed), edPublic, createdAt,
                      prekeys: [prekey], pid: await pidFor(edPublic) });
}

export const currentPrekey = (identity) => identity.prekeys[identity.prekeys.length - 1];

// Rotate when due and delete prekeys past grace (§2.5); `dropOld`: an update (§6.7).
export async function maintainPrekeys(identity, { at = now(), force = false, dropOld = false } = {}) {
  const current = currentPrekey(identity);
  const due = force || at - current.createdAt >= PREKEY_ROTATE_S || current.opens >= PREKEY_MAX_OPENS;
  if (due) {
    current.supersededAt = at;
    const fresh = await drawPrekey(current.id + 1, Math.max(at, current.createdAt + 1));
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
