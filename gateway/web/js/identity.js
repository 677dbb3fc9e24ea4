// A browser participant's identity (device/identity.py; PROTOCOL.md §2.1): Ed25519 and
// X25519 keys and the signed bundle that publishes them. The browser has no ML-KEM: its
// bundle carries nil, so rosters mark it as not post-quantum protected. The roster an
// admin issues is signed here too.

import { concat, utf8 } from "./bytes.js";
import { ed25519Sign, generateIdentityKeys, hkdf, importPrivate, publicOfPrivate } from "./crypto.js";
import { bundleBody, decodeRoster, pidFor, rosterBody } from "./wire.js";

const IDENTITY_INFO = utf8("fieldchat identity v1");

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

// A roster with `fields`, signed by `identity` as its issuer (§5.1).
export async function signRoster(identity, fields) {
  const body = rosterBody({ ...fields, signerKey: identity.edPublic });
  return decodeRoster(concat(body, await ed25519Sign(identity.edPrivate, body)));
}
