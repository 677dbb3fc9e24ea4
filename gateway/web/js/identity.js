// A browser participant's identity (device/identity.py; PROTOCOL.md §2.1): Ed25519, X25519
// and, where WebCrypto has it, ML-KEM-768 keys (private halves non-extractable CryptoKeys,
// kept in IndexedDB as they are), and the signed bundle that publishes them. Without
// ML-KEM the bundle carries nil: rosters mark the browser as X25519 only, and a
// conversation that requires post-quantum members cannot list it. The roster an admin
// issues is signed here too.

import { concat, utf8 } from "./bytes.js";
import {
  ed25519Sign, generateIdentityKeys, hkdf, importMlkemSeed, importPrivate, mlkemSupported, publicOfPrivate,
} from "./crypto.js";
import { bundleBody, decodeRoster, pidFor, rosterBody } from "./wire.js";

const IDENTITY_INFO = utf8("fieldchat identity v1");

async function makeIdentity(keys, createdAt) {
  const body = bundleBody(keys.edPublic, keys.xPublic, keys.kPublic ?? null, createdAt);
  const bundle = concat(body, await ed25519Sign(keys.edPrivate, body));
  return { kPrivate: null, kPublic: null, ...keys, createdAt, bundle, pid: await pidFor(keys.edPublic),
           postQuantum: !!keys.kPublic };
}

// A fresh identity; its private keys are non-extractable CryptoKeys.
export async function generateIdentity(createdAt = Math.floor(Date.now() / 1000)) {
  return makeIdentity(await generateIdentityKeys(), createdAt);
}

// The identity a 32-byte seed derives (PROTOCOL.md §2.1): reproducible identities for the
// protocol vectors. With `postQuantum` (and a browser that has ML-KEM) its ML-KEM-768 key
// too, from okm[64:128].
export async function identityFromSeed(seed, createdAt, { postQuantum = false } = {}) {
  const okm = await hkdf(seed, null, IDENTITY_INFO, 128);
  const ed = okm.slice(0, 32), x = okm.slice(32, 64);
  const kem = postQuantum && await mlkemSupported() ? await importMlkemSeed(okm.slice(64, 128)) : {};
  return makeIdentity({
    edPrivate: await importPrivate("ed25519", ed), edPublic: await publicOfPrivate("ed25519", ed),
    xPrivate: await importPrivate("x25519", x), xPublic: await publicOfPrivate("x25519", x), ...kem,
  }, createdAt);
}

// A roster with `fields`, signed by `identity` as its issuer (§5.1).
export async function signRoster(identity, fields) {
  const body = rosterBody({ ...fields, signerKey: identity.edPublic });
  return decodeRoster(concat(body, await ed25519Sign(identity.edPrivate, body)));
}
