// Byte helpers and the typed errors of the browser client (mirrors schemas/errors.py).

export class FieldchatError extends Error {
  constructor(message, reason = "error") {
    super(message);
    this.name = this.constructor.name;
    this.reason = reason;
  }
}
export class WireError extends FieldchatError {
  constructor(message, reason = "malformed") { super(message, reason); }
}
export class UnsupportedVersion extends WireError {
  constructor(message) { super(message, "version"); }
}
export class LimitExceeded extends WireError {
  constructor(message) { super(message, "limit"); }
}
// One opaque message for every failed authentication (PROTOCOL.md §7).
export class CryptoError extends FieldchatError {
  constructor(reason = "auth") { super("authentication failed", reason); }
}
export class ProtocolError extends FieldchatError {}
export const reasons = {
  notMember: "not_member", roster: "roster", grant: "grant", stale: "stale_epoch",
  jump: "forward_jump", oldStep: "old_step", missing: "missing_key", unsigned: "unsigned",
  unknownConv: "unknown_conversation", unknownPid: "unknown_participant",
};
export const protocolError = (reason, message) => new ProtocolError(message, reason);

const enc = new TextEncoder();
const dec = new TextDecoder("utf-8", { fatal: true });

export const utf8 = (s) => enc.encode(s);
export function fromUtf8(b) {
  try { return dec.decode(b); } catch { throw new WireError("invalid UTF-8"); }
}

export function concat(...parts) {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

export function equal(a, b) {
  if (!a || !b || a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i] ^ b[i];
  return d === 0;
}

export const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
export function fromHex(s) {
  if (s.length % 2 || /[^0-9a-f]/i.test(s)) throw new WireError("not hex");
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.substr(i * 2, 2), 16);
  return out;
}

export function b64(b) {
  let s = "";
  for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode(...b.subarray(i, i + 0x8000));
  return btoa(s);
}
export function fromB64(s) {
  let bin;
  try { bin = atob(s); } catch { throw new WireError("not base64"); }
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

// Ids: 16 bytes as 26 lowercase base32 characters, no padding (schemas/ids.py).
const B32 = "abcdefghijklmnopqrstuvwxyz234567";
export const ID_BYTES = 16;
const ID_RE = /^[a-z2-7]{25}[aeimquy4]$/;
export const isValidId = (s) => typeof s === "string" && ID_RE.test(s);

export function encodeId(raw) {
  if (raw.length !== ID_BYTES) throw new WireError("an id is 16 bytes");
  let bits = 0, value = 0, out = "";
  for (const byte of raw) {
    value = (value << 8) | byte; bits += 8;
    while (bits >= 5) { out += B32[(value >>> (bits - 5)) & 31]; bits -= 5; }
    value &= (1 << bits) - 1;
  }
  if (bits) out += B32[(value << (5 - bits)) & 31];
  return out;
}

export function decodeId(text) {
  if (!isValidId(text)) throw new FieldchatError(`invalid id ${String(text).slice(0, 40)}`, "invalid_id");
  const out = new Uint8Array(ID_BYTES);
  let bits = 0, value = 0, o = 0;
  for (const ch of text) {
    value = (value << 5) | B32.indexOf(ch); bits += 5;
    if (bits >= 8) { out[o++] = (value >>> (bits - 8)) & 255; bits -= 8; }
    value &= 0xff;
  }
  return out;
}

// Unsigned LEB128, at most 4 bytes, minimal form only (PROTOCOL.md §3.1).
export const MAX_VARINT = 2 ** 28 - 1;
export function varint(value) {
  if (!Number.isInteger(value) || value < 0 || value > MAX_VARINT) {
    throw new LimitExceeded(`varint ${value} out of range`);
  }
  const out = [];
  while (value >= 0x80) { out.push((value & 0x7f) | 0x80); value >>>= 7; }
  out.push(value);
  return Uint8Array.from(out);
}

export function readVarint(data, offset) {
  let value = 0;
  for (let i = 0; i < 4; i++) {
    const pos = offset + i;
    if (pos >= data.length) throw new WireError("truncated varint");
    const byte = data[pos];
    value += (byte & 0x7f) * 2 ** (7 * i);
    if (byte < 0x80) {
      if (byte === 0 && i > 0) throw new WireError("non-minimal varint");
      return [value, pos + 1];
    }
  }
  throw new WireError("varint too long");
}
