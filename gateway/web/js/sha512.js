// The chain step of PROTOCOL.md §6.2, HMAC-SHA512 keyed with a public label, in plain
// JavaScript. WebCrypto's HMAC is one promise and a hop to another thread per call:
// 512 steps cost 3-11 ms in Chromium here, and a receiver derives up to 512 of them for
// an envelope nothing has authenticated yet (§6.4). Here, with the label's pads hashed
// once (RFC 2104 §4), a step is two SHA-512 compressions. SHA-512 has no secret-dependent
// branch or table index, so nothing leaks through timing that WebCrypto would hide.
// The protocol vectors pin every output byte (tests/web/pages/vectors.js).

// FIPS 180-4 §4.2.3, §5.3.5: the first 64 bits of the fractional parts of the cube roots
// of the first 80 primes (K) and of the square roots of the first 8 (the initial state),
// computed with integer roots instead of spelt out: a wrong constant fails the vectors.
const K = new Int32Array(160);
const IV = new Int32Array(16);
{
  const primes = [];
  for (let n = 2; primes.length < 80; n++) if (primes.every((p) => n % p)) primes.push(n);
  const root = (x, k) => { // floor(x^(1/k)), Newton's method from above
    const kb = BigInt(k);
    let r = 1n << BigInt(Math.ceil(x.toString(2).length / k));
    for (;;) {
      const s = ((kb - 1n) * r + x / r ** (kb - 1n)) / kb;
      if (s >= r) return r;
      r = s;
    }
  };
  const put = (out, i, p, k) => {
    const v = root(BigInt(p) << BigInt(64 * k), k) & 0xffffffffffffffffn;
    out[2 * i] = Number(v >> 32n);
    out[2 * i + 1] = Number(v & 0xffffffffn);
  };
  primes.forEach((p, i) => put(K, i, p, 3));
  primes.slice(0, 8).forEach((p, i) => put(IV, i, p, 2));
}

const W = new Int32Array(160);
const TWO32 = 0x100000000;

// One SHA-512 compression: `H` (8 words as 16 big-endian 32-bit halves) absorbs the
// 128-byte block `M` (32 halves). 64-bit sums are made of two 32-bit halves; a sum of at
// most five 32-bit values is exact in a double, and its carry is the part above 2^32.
function compress(H, M) {
  const w = W;
  w.set(M);
  for (let i = 32; i < 160; i += 2) {
    let h = w[i - 30], l = w[i - 29]; // σ0 = ROTR1 ^ ROTR8 ^ SHR7
    const s0h = ((h >>> 1) | (l << 31)) ^ ((h >>> 8) | (l << 24)) ^ (h >>> 7);
    const s0l = ((l >>> 1) | (h << 31)) ^ ((l >>> 8) | (h << 24)) ^ ((l >>> 7) | (h << 25));
    h = w[i - 4]; l = w[i - 3]; // σ1 = ROTR19 ^ ROTR61 ^ SHR6
    const s1h = ((h >>> 19) | (l << 13)) ^ ((l >>> 29) | (h << 3)) ^ (h >>> 6);
    const s1l = ((l >>> 19) | (h << 13)) ^ ((h >>> 29) | (l << 3)) ^ ((l >>> 6) | (h << 26));
    const lo = (s0l >>> 0) + (s1l >>> 0) + (w[i - 13] >>> 0) + (w[i - 31] >>> 0);
    w[i] = s0h + s1h + w[i - 14] + w[i - 32] + ((lo / TWO32) | 0);
    w[i + 1] = lo;
  }
  let ah = H[0], al = H[1], bh = H[2], bl = H[3], ch = H[4], cl = H[5], dh = H[6], dl = H[7];
  let eh = H[8], el = H[9], fh = H[10], fl = H[11], gh = H[12], gl = H[13], hh = H[14], hl = H[15];
  for (let i = 0; i < 160; i += 2) {
    // Σ1(e) = ROTR14 ^ ROTR18 ^ ROTR41; Ch(e, f, g)
    const S1h = ((eh >>> 14) | (el << 18)) ^ ((eh >>> 18) | (el << 14)) ^ ((el >>> 9) | (eh << 23));
    const S1l = ((el >>> 14) | (eh << 18)) ^ ((el >>> 18) | (eh << 14)) ^ ((eh >>> 9) | (el << 23));
    const chh = (eh & fh) ^ (~eh & gh), chl = (el & fl) ^ (~el & gl);
    let lo = (hl >>> 0) + (S1l >>> 0) + (chl >>> 0) + (K[i + 1] >>> 0) + (w[i + 1] >>> 0);
    const t1h = (hh + S1h + chh + K[i] + w[i] + ((lo / TWO32) | 0)) | 0;
    const t1l = lo >>> 0;
    // Σ0(a) = ROTR28 ^ ROTR34 ^ ROTR39; Maj(a, b, c)
    const S0h = ((ah >>> 28) | (al << 4)) ^ ((al >>> 2) | (ah << 30)) ^ ((al >>> 7) | (ah << 25));
    const S0l = ((al >>> 28) | (ah << 4)) ^ ((ah >>> 2) | (al << 30)) ^ ((ah >>> 7) | (al << 25));
    const mh = (ah & bh) ^ (ah & ch) ^ (bh & ch), ml = (al & bl) ^ (al & cl) ^ (bl & cl);
    hh = gh; hl = gl; gh = fh; gl = fl; fh = eh; fl = el;
    lo = (dl >>> 0) + t1l;
    eh = (dh + t1h + ((lo / TWO32) | 0)) | 0; el = lo | 0;
    dh = ch; dl = cl; ch = bh; cl = bl; bh = ah; bl = al;
    lo = t1l + (S0l >>> 0) + (ml >>> 0);
    ah = (t1h + S0h + mh + ((lo / TWO32) | 0)) | 0; al = lo | 0;
  }
  const add = (k, xh, xl) => {
    const lo = (H[k + 1] >>> 0) + (xl >>> 0);
    H[k] = H[k] + xh + ((lo / TWO32) | 0);
    H[k + 1] = lo;
  };
  add(0, ah, al); add(2, bh, bl); add(4, ch, cl); add(6, dh, dl);
  add(8, eh, el); add(10, fh, fl); add(12, gh, gl); add(14, hh, hl);
}

// The states after the label's inner and outer pad blocks (HMAC's first block of each).
const LABEL = new TextEncoder().encode("fieldchat chain step v1");
const padState = (byte) => {
  const block = new Uint8Array(128).fill(byte);
  LABEL.forEach((b, i) => { block[i] ^= b; });
  const H = IV.slice();
  compress(H, words(block, new Int32Array(32)));
  return H;
};
function words(bytes, out) {
  for (let i = 0; i < bytes.length >> 2; i++) {
    out[i] = (bytes[4 * i] << 24) | (bytes[4 * i + 1] << 16) | (bytes[4 * i + 2] << 8) | bytes[4 * i + 3];
  }
  return out;
}
const INNER = padState(0x36);
const OUTER = padState(0x5c);
const M = new Int32Array(32);

// message key || next chain key = HMAC-SHA512("fieldchat chain step v1", chain key).
export function chainStep(chainKey) {
  if (chainKey.length !== 32) throw new TypeError("a chain key is 32 bytes");
  const inner = INNER.slice();
  M.fill(0);
  words(chainKey, M);
  M[8] = 0x80000000 | 0;
  M[31] = (128 + 32) * 8; // bits hashed: the pad block and the key
  compress(inner, M);
  const outer = OUTER.slice();
  M.fill(0);
  M.set(inner);
  M[16] = 0x80000000 | 0;
  M[31] = (128 + 64) * 8;
  compress(outer, M);
  const out = new Uint8Array(64);
  for (let i = 0; i < 16; i++) {
    const v = outer[i];
    out[4 * i] = v >>> 24; out[4 * i + 1] = v >>> 16; out[4 * i + 2] = v >>> 8; out[4 * i + 3] = v;
  }
  return out;
}
