// The primitives (as schemas/crypto.py is for Python): WebCrypto, but for the chain step.
// Every failure to authenticate or decrypt throws one opaque CryptoError (PROTOCOL.md §7).

import { CryptoError, concat } from "./bytes.js";

const subtle = globalThis.crypto.subtle;
const ED = { name: "Ed25519" };
const X = { name: "X25519" };

export const randomBytes = (n) => globalThis.crypto.getRandomValues(new Uint8Array(n));

export async function sha256(data) {
  return new Uint8Array(await subtle.digest("SHA-256", data));
}
export async function sha512(data) {
  return new Uint8Array(await subtle.digest("SHA-512", data));
}

// HKDF-SHA256 (RFC 5869); a missing salt is the empty string, which HMAC pads to zeros.
export async function hkdf(ikm, salt, info, length) {
  const key = await subtle.importKey("raw", ikm, "HKDF", false, ["deriveBits"]);
  const bits = await subtle.deriveBits(
    { name: "HKDF", hash: "SHA-256", salt: salt || new Uint8Array(0), info }, key, length * 8);
  return new Uint8Array(bits);
}

// PROTOCOL.md §6.2: message key || next chain key = HMAC-SHA512(label, chain key), in
// plain JavaScript (sha512.js says why: chain steps are the work a receiver does before
// it can authenticate an envelope).
export { chainStep } from "./sha512.js";

export function stepNonce(step) {
  const n = new Uint8Array(12);
  new DataView(n.buffer).setUint32(8, step);
  return n;
}

async function aesKey(raw, usage) {
  return subtle.importKey("raw", raw, "AES-GCM", false, [usage]);
}

export async function aeadSeal(key, nonce, plaintext, aad) {
  const k = await aesKey(key, "encrypt");
  return new Uint8Array(await subtle.encrypt({ name: "AES-GCM", iv: nonce, additionalData: aad }, k, plaintext));
}

export async function aeadOpen(key, nonce, sealed, aad) {
  if (sealed.length < 16) throw new CryptoError();
  const k = await aesKey(key, "decrypt");
  try {
    return new Uint8Array(await subtle.decrypt({ name: "AES-GCM", iv: nonce, additionalData: aad }, k, sealed));
  } catch {
    throw new CryptoError();
  }
}

// Ed25519 -------------------------------------------------------------------------------

const verifyKeys = new Map(); // hex of public key -> CryptoKey (bounded)
export async function ed25519Verify(publicKey, signature, data) {
  if (publicKey.length !== 32 || signature.length !== 64) throw new CryptoError();
  const id = String.fromCharCode(...publicKey);
  let key = verifyKeys.get(id);
  if (!key) {
    try {
      key = await subtle.importKey("raw", publicKey, ED, false, ["verify"]);
    } catch {
      throw new CryptoError();
    }
    if (verifyKeys.size > 1000) verifyKeys.clear();
    verifyKeys.set(id, key);
  }
  let ok = false;
  try { ok = await subtle.verify(ED, key, signature, data); } catch { ok = false; }
  if (!ok) throw new CryptoError();
}

export async function ed25519Sign(privateKey, data) {
  return new Uint8Array(await subtle.sign(ED, privateKey, data));
}

// X25519 ---------------------------------------------------------------------------------

export async function x25519(privateKey, publicRaw) {
  let pub;
  try {
    pub = await subtle.importKey("raw", publicRaw, X, true, []);
  } catch {
    throw new CryptoError("weak_key");
  }
  let bits;
  try {
    bits = new Uint8Array(await subtle.deriveBits({ name: "X25519", public: pub }, privateKey, 256));
  } catch {
    throw new CryptoError("weak_key"); // Chromium refuses low-order points itself
  }
  if (bits.every((b) => b === 0)) throw new CryptoError("weak_key");
  return bits;
}

export async function rawPublic(key) {
  return new Uint8Array(await subtle.exportKey("raw", key));
}

// Key pairs made in this browser: the private halves are not extractable.
export async function generateEdKeys() {
  const ed = await subtle.generateKey(ED, false, ["sign", "verify"]);
  return { privateKey: ed.privateKey, publicRaw: await rawPublic(ed.publicKey) };
}

export async function generateXKeys() {
  const x = await subtle.generateKey(X, false, ["deriveBits"]);
  return { privateKey: x.privateKey, publicRaw: await rawPublic(x.publicKey) };
}

export const generateEphemeral = generateXKeys;

// Private keys from raw bytes, for the protocol vectors and for deterministic tests
// (PROTOCOL.md §2.1 derives them from a seed). PKCS#8 wraps a 32-byte private key
// with a fixed 16-byte prefix (RFC 8410).
const PKCS8 = (oid) => Uint8Array.from([0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, oid, 0x04, 0x22, 0x04, 0x20]);
export async function importPrivate(kind, raw, extractable = false) {
  const alg = kind === "ed25519" ? ED : X;
  const usages = kind === "ed25519" ? ["sign"] : ["deriveBits"];
  const oid = kind === "ed25519" ? 0x70 : 0x6e;
  return subtle.importKey("pkcs8", concat(PKCS8(oid), raw), alg, extractable, usages);
}

// The public key of an imported private key: export as JWK needs extractable keys, so
// the derivation imports once extractable, reads `x`, and keeps a non-extractable copy.
export async function publicOfPrivate(kind, raw) {
  const key = await importPrivate(kind, raw, true);
  const jwk = await subtle.exportKey("jwk", key);
  const b = atob(jwk.x.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - jwk.x.length % 4) % 4));
  return Uint8Array.from(b, (c) => c.charCodeAt(0));
}
