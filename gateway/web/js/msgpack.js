// msgpack for the shapes fieldchat uses (PROTOCOL.md §4.1): arrays, integers, booleans,
// nil, str and bin. Maps, floats and extension types are refused, so every object has
// one canonical encoding, byte-identical to Python's msgpack.Packer(use_bin_type=True):
// signatures over rosters, bundles and grants depend on it.

import { LimitExceeded, WireError, concat, fromUtf8, utf8 } from "./bytes.js";

export const MAX_OBJECT_BYTES = 65536;
const MAX_DEPTH = 16;

export function pack(value) {
  const parts = [];
  write(value, parts, 0);
  return concat(...parts);
}

function head(...bytes) { return Uint8Array.from(bytes); }

function u16(tag, n) { return head(tag, n >>> 8, n & 255); }
function u32(tag, n) { return head(tag, n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255); }

function writeInt(n, parts) {
  if (!Number.isSafeInteger(n)) throw new LimitExceeded("integer outside the safe range");
  if (n >= 0) {
    if (n < 0x80) parts.push(head(n));
    else if (n < 0x100) parts.push(head(0xcc, n));
    else if (n < 0x10000) parts.push(u16(0xcd, n));
    else if (n < 0x100000000) parts.push(u32(0xce, n));
    else {
      const b = new Uint8Array(9);
      b[0] = 0xcf;
      new DataView(b.buffer).setBigUint64(1, BigInt(n));
      parts.push(b);
    }
  } else if (n >= -32) parts.push(head(n & 0xff));
  else if (n >= -0x80) parts.push(head(0xd0, n & 0xff));
  else if (n >= -0x8000) parts.push(u16(0xd1, n & 0xffff));
  else if (n >= -0x80000000) parts.push(u32(0xd2, n >>> 0));
  else {
    const b = new Uint8Array(9);
    b[0] = 0xd3;
    new DataView(b.buffer).setBigInt64(1, BigInt(n));
    parts.push(b);
  }
}

function write(value, parts, depth) {
  if (depth > MAX_DEPTH) throw new LimitExceeded("msgpack nesting too deep");
  if (value === null || value === undefined) parts.push(head(0xc0));
  else if (value === false) parts.push(head(0xc2));
  else if (value === true) parts.push(head(0xc3));
  else if (typeof value === "number") writeInt(value, parts);
  else if (typeof value === "string") {
    const b = utf8(value);
    const n = b.length;
    if (n < 32) parts.push(head(0xa0 | n));
    else if (n < 0x100) parts.push(head(0xd9, n));
    else if (n < 0x10000) parts.push(u16(0xda, n));
    else parts.push(u32(0xdb, n));
    parts.push(b);
  } else if (value instanceof Uint8Array) {
    const n = value.length;
    if (n < 0x100) parts.push(head(0xc4, n));
    else if (n < 0x10000) parts.push(u16(0xc5, n));
    else parts.push(u32(0xc6, n));
    parts.push(value);
  } else if (Array.isArray(value)) {
    const n = value.length;
    if (n < 16) parts.push(head(0x90 | n));
    else if (n < 0x10000) parts.push(u16(0xdc, n));
    else parts.push(u32(0xdd, n));
    for (const item of value) write(item, parts, depth + 1);
  } else throw new WireError(`cannot encode ${typeof value} as msgpack`);
}

// Decode exactly one object with nothing trailing. `what` names it in errors.
export function unpack(data, what = "msgpack") {
  if (data.length > MAX_OBJECT_BYTES) throw new LimitExceeded(`${what} too large`);
  const r = { data, view: new DataView(data.buffer, data.byteOffset, data.byteLength), pos: 0, what };
  const value = read(r, 0);
  if (r.pos !== data.length) throw new WireError(`${what} has trailing bytes`);
  return value;
}

function need(r, n) {
  if (r.pos + n > r.data.length) throw new WireError(`${r.what} is truncated`);
  const at = r.pos;
  r.pos += n;
  return at;
}

function read(r, depth) {
  if (depth > MAX_DEPTH) throw new LimitExceeded(`${r.what} nests too deep`);
  const t = r.data[need(r, 1)];
  const v = r.view;
  if (t < 0x80) return t;
  if (t >= 0xe0) return t - 0x100;
  if ((t & 0xf0) === 0x90) return readArray(r, t & 15, depth);
  if ((t & 0xe0) === 0xa0) return readStr(r, t & 31);
  switch (t) {
    case 0xc0: return null;
    case 0xc2: return false;
    case 0xc3: return true;
    case 0xc4: return readBin(r, r.data[need(r, 1)]);
    case 0xc5: return readBin(r, v.getUint16(need(r, 2)));
    case 0xc6: return readBin(r, v.getUint32(need(r, 4)));
    case 0xcc: return r.data[need(r, 1)];
    case 0xcd: return v.getUint16(need(r, 2));
    case 0xce: return v.getUint32(need(r, 4));
    case 0xcf: return safe(r, v.getBigUint64(need(r, 8)));
    case 0xd0: return v.getInt8(need(r, 1));
    case 0xd1: return v.getInt16(need(r, 2));
    case 0xd2: return v.getInt32(need(r, 4));
    case 0xd3: return safe(r, v.getBigInt64(need(r, 8)));
    case 0xd9: return readStr(r, r.data[need(r, 1)]);
    case 0xda: return readStr(r, v.getUint16(need(r, 2)));
    case 0xdb: return readStr(r, v.getUint32(need(r, 4)));
    case 0xdc: return readArray(r, v.getUint16(need(r, 2)), depth);
    case 0xdd: return readArray(r, v.getUint32(need(r, 4)), depth);
    default: throw new WireError(`${r.what}: msgpack type 0x${t.toString(16)} is not used`);
  }
}

function safe(r, big) {
  if (big > BigInt(Number.MAX_SAFE_INTEGER) || big < BigInt(Number.MIN_SAFE_INTEGER)) {
    throw new LimitExceeded(`${r.what}: integer too large`);
  }
  return Number(big);
}

function readBin(r, n) {
  const at = need(r, n);
  return r.data.slice(at, at + n);
}

function readStr(r, n) {
  const at = need(r, n);
  return fromUtf8(r.data.subarray(at, at + n));
}

function readArray(r, n, depth) {
  if (n > r.data.length - r.pos) throw new WireError(`${r.what} is truncated`);
  const out = new Array(n);
  for (let i = 0; i < n; i++) out[i] = read(r, depth + 1);
  return out;
}

// An array of exactly `count` items, or a WireError.
export function fields(value, count, what) {
  if (!Array.isArray(value) || value.length !== count) {
    throw new WireError(`${what} must be an array of ${count} items`);
  }
  return value;
}
