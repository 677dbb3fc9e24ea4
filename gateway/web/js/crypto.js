// The primitives (as schemas/crypto.py is for Python): WebCrypto, but for the chain step.
// Every failure to authenticate or decrypt throws one opaque CryptoError (PROTOCOL.md §7).

import { CryptoError, concat } from "./bytes.js";

const subtle = globalThis.crypto.subtle;
const ED = { name: "Ed25519" };
const X = { name: "X25519" };
const MLKEM = { name: "ML-KEM-768" };
export const MLKEM_PUBLIC_BYTES = 1184;
export const MLKEM_CIPHERTEXT_BYTES = 1088;

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

// ML-KEM-768 (FIPS 203) -------------------------------------------------------------------
// WebCrypto's, where the browser has it ("Modern Algorithms in the Web Cryptography API":
// generateKey / encapsulateBits / decapsulateBits, "raw-public" and "raw-seed" formats).

let mlkemProbe = null;
// Whether this browser can make and use ML-KEM-768 keys (asked once per page).
export function mlkemSupported() {
  mlkemProbe ??= (async () => {
    if (typeof subtle.encapsulateBits !== "function" || typeof subtle.decapsulateBits !== "function") return false;
    try {
      await subtle.generateKey(MLKEM, false, ["encapsulateBits", "decapsulateBits"]);
      return true;
    } catch {
      return false;
    }
  })();
  return mlkemProbe;
}

async function mlkemPair(privateKey, publicKey) {
  return { kPrivate: privateKey, kPublic: new Uint8Array(await subtle.exportKey("raw-public", publicKey)) };
}

async function generateMlkem() {
  const pair = await subtle.generateKey(MLKEM, false, ["encapsulateBits", "decapsulateBits"]);
  return mlkemPair(pair.privateKey, pair.publicKey);
}

// The ML-KEM-768 key of a 64-byte seed d || z (PROTOCOL.md §2.1), private half not extractable.
export async function importMlkemSeed(seed) {
  const privateKey = await subtle.importKey("raw-seed", seed, MLKEM, false, ["decapsulateBits"]);
  return mlkemPair(privateKey, await subtle.getPublicKey(privateKey, ["encapsulateBits"]));
}

async function mlkemEncapsulate(publicRaw) {
  let key;
  try {
    key = await subtle.importKey("raw-public", publicRaw, MLKEM, false, ["encapsulateBits"]);
  } catch {
    throw new CryptoError("weak_key"); // the modulus check of FIPS 203 §7.2
  }
  const out = await subtle.encapsulateBits(MLKEM, key);
  return { shared: new Uint8Array(out.sharedKey), ciphertext: new Uint8Array(out.ciphertext) };
}

async function mlkemDecapsulate(privateKey, ciphertext) {
  if (ciphertext.length !== MLKEM_CIPHERTEXT_BYTES) throw new CryptoError();
  try {
    return new Uint8Array(await subtle.decapsulateBits(MLKEM, privateKey, ciphertext));
  } catch {
    throw new CryptoError();
  }
}

// The hybrid KEM (PROTOCOL.md §5.3; schemas/crypto.py hybrid_seal / hybrid_open) ---------------

const HYBRID_LABEL = new TextEncoder().encode("fieldchat hybrid v1");

// key, nonce and th from both secrets and everything they depend on: th = SHA-256(mode ||
// ephemeral || kem_ct || x25519_pub || mlkem_pub || context), mode 0x01 hybrid, 0x02 X25519.
async function hybridKeys(shared, ephemeral, kemCiphertext, x25519Public, mlkem768Public, context) {
  const hybrid = kemCiphertext !== null;
  const th = await sha256(concat(Uint8Array.of(hybrid ? 1 : 2), ephemeral, kemCiphertext ?? new Uint8Array(0),
                                 x25519Public, hybrid ? mlkem768Public : new Uint8Array(0), context));
  const okm = await hkdf(shared, HYBRID_LABEL, th, 44);
  return { key: okm.subarray(0, 32), nonce: okm.subarray(32), th };
}

// Seal `plaintext` to a recipient's X25519 and (when given) ML-KEM-768 public keys, bound to
// `context`: hybrid when `mlkem768Public` is given, X25519 only when it is null.
export async function hybridSeal({ x25519Public, mlkem768Public = null, context, plaintext, ephemeral = null }) {
  const eph = ephemeral ?? await generateEphemeral();
  let shared = await x25519(eph.privateKey, x25519Public);
  let kemCiphertext = null;
  if (mlkem768Public) {
    const kem = await mlkemEncapsulate(mlkem768Public);
    shared = concat(shared, kem.shared);
    kemCiphertext = kem.ciphertext;
  }
  const { key, nonce, th } = await hybridKeys(shared, eph.publicRaw, kemCiphertext, x25519Public, mlkem768Public, context);
  return { ephemeral: eph.publicRaw, kemCiphertext, sealed: await aeadSeal(key, nonce, plaintext, th) };
}

// Open what hybridSeal made for our keys (`keys`: xPrivate, xPublic, kPrivate, kPublic; the
// public halves too, as the combiner binds them). A hybrid message needs our ML-KEM key.
export async function hybridOpen(keys, { ephemeral, kemCiphertext = null, sealed }, context) {
  let shared = await x25519(keys.xPrivate, ephemeral);
  if (kemCiphertext !== null) {
    if (!keys.kPrivate || !keys.kPublic) throw new CryptoError();
    shared = concat(shared, await mlkemDecapsulate(keys.kPrivate, kemCiphertext));
  }
  const { key, nonce, th } = await hybridKeys(shared, ephemeral, kemCiphertext, keys.xPublic, keys.kPublic, context);
  return aeadOpen(key, nonce, sealed, th);
}

// Key pairs made in this browser: the private halves are not extractable.
export async function generateEdKeys() {
  const ed = await subtle.generateKey(ED, false, ["sign", "verify"]);
  return { privateKey: ed.privateKey, publicRaw: await rawPublic(ed.publicKey) };
}

// A prekey's ML-KEM-768 pair where this browser has it ({kPrivate, kPublic}), else nulls.
export async function generateKemKeys() {
  return await mlkemSupported() ? generateMlkem() : { kPrivate: null, kPublic: null };
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
