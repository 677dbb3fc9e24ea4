// The wire format in the browser (schemas/ in Python; PROTOCOL.md §2-§5): bundles with their
// prekeys, rosters, epoch-secret deliveries, grants, envelopes and plaintexts, encoded byte
// for byte as Python encodes them.

import {
  CryptoError, LimitExceeded, UnsupportedVersion, WireError, concat, decodeId, encodeId,
  equal, isValidId, protocolError, readVarint, utf8, varint,
} from "./bytes.js";
import { ed25519Verify, sha256, sha512 } from "./crypto.js";
import { fields, pack, unpack } from "./msgpack.js";

export const VERSION = 0x01;
export const KIND = { grant: 0x10, bundle: 0x11, roster: 0x12, delivery: 0x13 };
export const CONTROL = { leave: 1, rekey: 2, ends: 3, update: 4, joined: 5 };
export const MSG = { text: 1, receipt: 2, control: 3 };
export const FLAG = { signed: 0x80, compressed: 0x40, padded: 0x20 };
export const TAG_BYTES = 16;
export const SIG_BYTES = 64;
export const MAX_ENVELOPE_BYTES = 65536;
export const MAX_COVER = 1023; // unsigned steps a signed envelope covers (§6.5)
export const MAX_PLAINTEXT_BYTES = 32768;
export const MAX_TEXT_CHARS = 16384;
export const MAX_RECEIPT_RANGES = 256;
export const MAX_MEMBERS = 256;
export const MIN_PAD_BUCKET = 32;
export const GRANT_MODE = { hybrid: 1, x25519: 2 };
const MLKEM_PUBLIC = 1184;
export const MLKEM_CT = 1088;
export const U28 = 2 ** 28;

export const isInt = (v, lo, hi) => Number.isInteger(v) && v >= lo && v < hi;
export const isBytes = (v, n) => v instanceof Uint8Array && (n === undefined || v.length === n);

export async function pidFor(ed25519) {
  return encodeId((await sha256(ed25519)).subarray(0, 16));
}

export async function cidFor(creatorPid, nonce) {
  const digest = await sha256(concat(utf8("fieldchat cid v1"), decodeId(creatorPid), nonce));
  return encodeId(digest.subarray(0, 16));
}

// Signed objects: version | kind | msgpack body | Ed25519 signature (schemas/_signed.py).
const signedBody = (kind, body) => concat(Uint8Array.of(VERSION, kind), pack(body));

export function split(data, kind, count, what) {
  if (!(data instanceof Uint8Array) || !data.length) throw new WireError(`empty ${what}`);
  if (data[0] !== VERSION) throw new UnsupportedVersion(`unsupported ${what} version ${data[0]}`);
  if (data.length < 3 + SIG_BYTES || data[1] !== kind) throw new WireError(`not a ${what}`);
  const signed = data.subarray(0, data.length - SIG_BYTES);
  const signature = data.slice(data.length - SIG_BYTES);
  return { body: fields(unpack(signed.subarray(2), what), count, what), signed, signature };
}

// Bundles (§2.2): the identity key and the current prekey (§2.4), signed by the former.

export const prekeyFields = (p) => [p.id, p.x25519, p.mlkem768 ?? null, p.createdAt];

export function bundleBody(ed25519, createdAt, prekey) {
  return signedBody(KIND.bundle, [ed25519, createdAt, prekeyFields(prekey)]);
}

export async function decodeBundle(data) {
  const { body, signed, signature } = split(data, KIND.bundle, 3, "bundle");
  const [ed25519, createdAt, rawPrekey] = body;
  const [id, x25519, mlkem768, prekeyCreatedAt] = fields(rawPrekey, 4, "prekey");
  if (!isBytes(ed25519, 32) || !isInt(createdAt, 0, 2 ** 40) || !isInt(id, 1, U28) ||
      !isBytes(x25519, 32) || !(mlkem768 === null || isBytes(mlkem768, MLKEM_PUBLIC)) ||
      !isInt(prekeyCreatedAt, 0, 2 ** 40)) {
    throw new WireError("invalid bundle");
  }
  await ed25519Verify(ed25519, signature, signed);
  return { ed25519, createdAt, prekey: { id, x25519, mlkem768, createdAt: prekeyCreatedAt },
           signature, bytes: data, pid: await pidFor(ed25519), postQuantum: mlkem768 !== null };
}

// PROTOCOL.md §2.3: twelve groups of five digits from SHA-512 over the identity key (every
// other key is signed by it).
export async function fingerprint(bundle) {
  const d = await sha512(concat(utf8("fieldchat fingerprint v2"), bundle.ed25519));
  const groups = [];
  for (let i = 0; i < 12; i++) {
    let n = 0;
    for (let j = 0; j < 5; j++) n = n * 256 + d[i * 5 + j];
    groups.push(String(n % 100000).padStart(5, "0"));
  }
  return groups.join(" ");
}

// Rosters (§5.2) ---------------------------------------------------------------------------

const M_ADMIN = 1, M_PQ = 2, P_COMPRESS = 1, P_PAD = 2, P_REQUIRE_PQ = 4;

export function rosterBody(r) {
  const pflags = (r.policy.compress ? P_COMPRESS : 0) | (r.policy.pad ? P_PAD : 0) |
                 (r.policy.requirePq ? P_REQUIRE_PQ : 0);
  return signedBody(KIND.roster, [
    r.cid, r.epoch, r.nonce, r.prev,
    r.members.map((m) => [m.key, (m.admin ? M_ADMIN : 0) | (m.pq ? M_PQ : 0)]),
    [r.policy.signEvery, pflags], r.issuedAt, r.signerKey, r.commit,
  ]);
}

export async function decodeRoster(data) {
  const { body, signed, signature } = split(data, KIND.roster, 9, "roster");
  const [cid, epoch, nonce, prev, rawMembers, rawPolicy, issuedAt, signerKey, commit] = body;
  if (!isValidId(cid) || !isInt(epoch, 0, U28) || !isBytes(nonce) || !isBytes(prev) ||
      !isInt(issuedAt, 0, 2 ** 40) || !isBytes(signerKey, 32) || !isBytes(commit, 32)) {
    throw new WireError("invalid roster");
  }
  if (!Array.isArray(rawMembers) || rawMembers.length < 1 || rawMembers.length > MAX_MEMBERS) {
    throw new WireError("a roster has 1 to 256 members");
  }
  const members = await Promise.all(rawMembers.map(async (raw) => {
    const [key, flags] = fields(raw, 2, "roster member");
    if (!isBytes(key, 32) || !isInt(flags, 0, 4)) throw new WireError("invalid roster member");
    return { key, pid: await pidFor(key), admin: !!(flags & M_ADMIN), pq: !!(flags & M_PQ) };
  }));
  if (new Set(members.map((m) => m.pid)).size !== members.length) throw new WireError("duplicate member");
  const [signEvery, pflags] = fields(rawPolicy, 2, "roster policy");
  if (!isInt(signEvery, 0, 1025) || !isInt(pflags, 0, 8)) throw new WireError("invalid roster policy");
  if (epoch === 0 ? nonce.length !== 16 || prev.length : nonce.length || prev.length !== 32) {
    throw new WireError("invalid roster nonce or prev");
  }
  await ed25519Verify(signerKey, signature, signed);
  return {
    cid, epoch, nonce, prev, members, pids: members.map((m) => m.pid), issuedAt, signerKey, commit, signature, bytes: data,
    policy: { signEvery, compress: !!(pflags & P_COMPRESS), pad: !!(pflags & P_PAD),
              requirePq: !!(pflags & P_REQUIRE_PQ) },
    signer: await pidFor(signerKey), digest: await sha256(data),
  };
}

// An inbox payload is a roster (an inviting admin sends the earlier ones, §5.2), a delivery
// (§5.3) or a grant (§5.4).
export const isRoster = (data) => data instanceof Uint8Array && data.length > 1 && data[1] === KIND.roster;
export const isDelivery = (data) => data instanceof Uint8Array && data.length > 1 && data[0] === VERSION &&
  data[1] === KIND.delivery;

export const isAdmin = (roster, pid) => roster.members.some((m) => m.pid === pid && m.admin);

// verify_roster_chain of schemas/roster.py.
export async function verifyRosterChain(next, prev) {
  const reject = (why) => { throw protocolError("roster", why); };
  if (prev === null) {
    if (next.epoch !== 0) reject("the first roster must be epoch 0");
    if ((await cidFor(next.signer, next.nonce)) !== next.cid) reject("epoch 0 not signed by its creator");
    if (!isAdmin(next, next.signer)) reject("the creator must be an admin of epoch 0");
    return;
  }
  if (next.cid !== prev.cid) reject("roster for another conversation");
  if (next.epoch !== prev.epoch + 1) reject(`epoch ${next.epoch} does not follow ${prev.epoch}`);
  if (!equal(next.prev, prev.digest)) reject(`epoch ${next.epoch} does not extend epoch ${prev.epoch}`);
  if (!isAdmin(prev, next.signer)) reject(`epoch ${next.epoch} not signed by an admin`);
  if (!next.members.some((m) => m.admin)) reject("a roster needs at least one admin");
}

// At most this many chain ends in an ENDS control or a ChainGrant (§6.5).
export const MAX_CHAIN_ENDS = 4;

// Envelopes (§3) ---------------------------------------------------------------------------

// `cover` (signed only): the unsigned steps just before this one it covers (§3.2, §6.5).
export function envelopeHeader(kindByte, epoch, sender, chain, step, cover = 0) {
  const head = concat(Uint8Array.of(VERSION, kindByte), varint(epoch), varint(sender), varint(chain), varint(step));
  if (!(kindByte & FLAG.signed)) {
    if (cover) throw new WireError("only a signed envelope covers others");
    return head;
  }
  if (cover < 0 || cover > MAX_COVER) throw new LimitExceeded(`cover ${cover} is above ${MAX_COVER}`);
  return concat(head, varint(cover));
}

export function readHeader(data) {
  if (!(data instanceof Uint8Array) || !data.length) throw new WireError("empty envelope");
  if (data[0] !== VERSION) throw new UnsupportedVersion(`unsupported envelope version ${data[0]}`);
  if (data.length > MAX_ENVELOPE_BYTES) throw new LimitExceeded("envelope too large");
  if (data.length < 2) throw new WireError("truncated envelope header");
  const kindByte = data[1];
  let pos = 2, epoch, sender, chain, step;
  [epoch, pos] = readVarint(data, pos);
  [sender, pos] = readVarint(data, pos);
  [chain, pos] = readVarint(data, pos);
  [step, pos] = readVarint(data, pos);
  let cover = 0;
  if (kindByte & FLAG.signed) {
    [cover, pos] = readVarint(data, pos);
    if (cover > MAX_COVER) throw new LimitExceeded(`cover ${cover} is above ${MAX_COVER}`);
  }
  const kind = kindByte & 0x1f;
  if (kind < 1 || kind > 3) throw new WireError(`unknown envelope kind ${kind}`);
  const flags = kindByte & 0xe0;
  const sig = flags & FLAG.signed ? SIG_BYTES : 0;
  if (data.length - sig - pos < TAG_BYTES) throw new WireError("envelope too short for its ciphertext");
  return { kind, flags, epoch, sender, chain, step, cover, headerLength: pos };
}

// Plaintexts (§4) --------------------------------------------------------------------------

export function padmeLength(length) {
  if (length <= MIN_PAD_BUCKET) return MIN_PAD_BUCKET;
  const exp = 31 - Math.clz32(length);
  const lowBits = exp - (32 - Math.clz32(exp));
  const mask = 2 ** lowBits - 1;
  return Math.floor((length + mask) / (mask + 1)) * (mask + 1);
}

async function streamThrough(data, stream, limit) {
  const chunks = [];
  let total = 0;
  const reader = new Blob([data]).stream().pipeThrough(stream).getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      total += value.length;
      if (total > limit) throw new LimitExceeded("compressed plaintext expands beyond the limit");
      chunks.push(value);
    }
  } catch (err) {
    if (err instanceof LimitExceeded) { reader.cancel().catch(() => {}); throw err; }
    throw new WireError("bad compressed plaintext");
  }
  return concat(...chunks);
}

function messageBody(m) {
  if (m.kind === MSG.text) return [m.sentAt, m.text];
  if (m.kind === MSG.receipt) return [m.type, m.ranges];
  if (m.op === CONTROL.ends) return [m.op, m.ends.map((e) => [...e])];
  if (m.op === CONTROL.update) return [m.op, m.prekeyId, m.prekeyDigest];
  return [m.op];
}

export async function encodePlaintext(message, policy = {}) {
  if (message.kind === MSG.text) {
    if (!isInt(message.sentAt, 0, 2 ** 40)) throw new WireError("sent_at out of range");
    if ([...message.text].length > MAX_TEXT_CHARS) throw new LimitExceeded("text too long");
  }
  let data = pack(messageBody(message));
  let compressed = false;
  if (policy.compress) {
    const squeezed = await streamThrough(data, new CompressionStream("deflate-raw"), MAX_ENVELOPE_BYTES);
    if (squeezed.length < data.length) { data = squeezed; compressed = true; }
  }
  if (policy.pad) {
    const target = padmeLength(data.length + 1);
    const out = new Uint8Array(target);
    out.set(data);
    out[data.length] = 0x80;
    data = out;
  }
  if (data.length > MAX_PLAINTEXT_BYTES) throw new LimitExceeded("plaintext too large");
  return { data, compressed, padded: !!policy.pad };
}

export async function decodePlaintext(kind, data, { compressed = false, padded = false } = {}) {
  if (padded) {
    let end = data.length;
    while (end > 0 && data[end - 1] === 0) end--;
    if (!end || data[end - 1] !== 0x80) throw new WireError("bad padding");
    data = data.subarray(0, end - 1);
  }
  if (compressed) data = await streamThrough(data, new DecompressionStream("deflate-raw"), MAX_PLAINTEXT_BYTES);
  const value = unpack(data, "plaintext");
  if (kind === MSG.text) {
    const [sentAt, text] = fields(value, 2, "text message");
    if (!isInt(sentAt, 0, 2 ** 40) || typeof text !== "string") throw new WireError("invalid text message");
    if ([...text].length > MAX_TEXT_CHARS) throw new LimitExceeded("text too long");
    return { kind, sentAt, text };
  }
  if (kind === MSG.receipt) {
    const [type, ranges] = fields(value, 2, "receipt");
    // 1 delivered, 2 read, 3 missing (a gap request: PROTOCOL.md §4.1).
    if (![1, 2, 3].includes(type) || !Array.isArray(ranges) || !ranges.length ||
        ranges.length > MAX_RECEIPT_RANGES) throw new WireError("invalid receipt");
    for (const r of ranges) {
      fields(r, 5, "receipt range");
      if (!r.every((n) => isInt(n, 0, U28))) throw new WireError("invalid receipt range");
    }
    return { kind, type, ranges };
  }
  // Controls (§4.1): LEAVE, REKEY; ENDS [3, ends] (§6.5); UPDATE [4, prekey id, digest] (§6.7).
  if (!Array.isArray(value) || !value.length) throw new WireError("invalid control");
  const op = value[0];
  if (op === CONTROL.ends) {
    const [, rawEnds] = fields(value, 2, "ends control");
    if (!Array.isArray(rawEnds)) throw new WireError("chain ends must be an array");
    if (rawEnds.length > MAX_CHAIN_ENDS) throw new LimitExceeded(`an ENDS control states at most ${MAX_CHAIN_ENDS} chain ends`);
    const ends = rawEnds.map((raw) => {
      const end = fields(raw, 3, "chain end");
      if (!end.every((n) => isInt(n, 0, U28))) throw new WireError("invalid chain end");
      return end;
    });
    if (new Set(ends.map(([e, c]) => `${e}/${c}`)).size !== ends.length) throw new WireError("a chain end is stated twice");
    return { kind, op, ends };
  }
  if (op === CONTROL.update) {
    const [, prekeyId, prekeyDigest] = fields(value, 3, "update control");
    if (!isInt(prekeyId, 1, U28) || !isBytes(prekeyDigest, 32)) throw new WireError("invalid update control");
    return { kind, op, prekeyId, prekeyDigest };
  }
  fields(value, 1, "control");
  if (![CONTROL.leave, CONTROL.rekey, CONTROL.joined].includes(op)) throw new WireError("unknown control op");
  return { kind, op };
}

export { CryptoError };
