// Delayed authentication of unsigned envelopes (device/_coverage.py; PROTOCOL.md §6.5).
//
// With sign_every = N only every Nth envelope is signed; an unsigned one proves only that
// some member holding the chain key sealed it. Each signed envelope's AES-GCM tag also
// covers the digests of the unsigned envelopes of its chain just before it (its header's
// `cover` counts them), and its signature proves those tag bytes are the sender's. Once a
// receiver holds the covered envelopes it knows whether what it showed is what the sender
// sent: "verified", or "forged" by another member. Bounded state and work per chain, as in
// Python: MAX_PENDING digests and keys, MAX_OTHERS further candidates, MAX_WAITING signed
// envelopes, MAX_COVER_TRIES tag checks per signed envelope.

import { concat, equal } from "./bytes.js";
import { aeadOpen, sha256, stepNonce } from "./crypto.js";

export const MAX_COVER = 1023;
export const MAX_PENDING = MAX_COVER;
export const MAX_OTHERS = 16;
export const MAX_WAITING = 4;
export const MAX_COVER_TRIES = 64;

const LABEL = new TextEncoder().encode("fieldchat coverage v1");

export const envelopeDigest = (data) => sha256(data);

// SHA-256("fieldchat coverage v1" || d_1 || … || d_n), empty for none (§3.3).
export async function coverageDigest(digests) {
  return digests.length ? sha256(concat(LABEL, ...digests)) : new Uint8Array(0);
}

async function opens(key, step, sealed, aad) {
  try { await aeadOpen(key, stepNonce(step), sealed, aad); return true; } catch { return false; }
}

// Every combination of one choice per position, the first choices first, at most `limit`.
function* combinations(choices, limit) {
  const at = choices.map(() => 0);
  for (let n = 0; n < limit; n++) {
    yield at.map((i, p) => choices[p][i]);
    let p = choices.length - 1;
    while (p >= 0 && ++at[p] === choices[p].length) at[p--] = 0;
    if (p < 0) return;
  }
}

export class ChainCoverage {
  constructor() {
    this.shown = new Map();   // step -> digest of the candidate opened (shown as pending)
    this.keys = new Map();    // step -> its message key (to authenticate another candidate)
    this.others = new Map();  // step -> [digest] of other candidates that authenticated
    this.waiting = new Map(); // signed step -> {step, cover, key, sealed, aad}
  }

  pending(step) { return this.shown.has(step); }

  // An unsigned envelope of `step` opened (shown as pending); what got settled.
  unsigned(step, digest, key) {
    this.shown.set(step, digest);
    this.keys.set(step, key);
    if (this.shown.size > MAX_PENDING) this._forget(Math.min(...this.shown.keys()));
    return this.retry(step);
  }

  // Another envelope for a pending `step`: whether it is a new authentic candidate.
  async candidate(step, digest, sealed, aad) {
    const others = this.others.get(step) ?? [];
    if (equal(this.shown.get(step), digest) || others.some((d) => equal(d, digest))) return false;
    let kept = 0;
    for (const list of this.others.values()) kept += list.length;
    if (kept >= MAX_OTHERS) return false;
    if (!await opens(this.keys.get(step), step, sealed, aad)) return false;
    this.others.set(step, [...others, digest]);
    return true;
  }

  // A signed envelope (signature verified) covering `cover` steps before it.
  async signed(step, cover, key, sealed, aad) {
    if (!cover) return [];
    const signed = { step, cover, key, sealed, aad };
    for (let s = step - cover; s < step; s++) {
      if (!this.shown.has(s)) {
        this.waiting.set(step, signed);
        if (this.waiting.size > MAX_WAITING) this.waiting.delete(Math.min(...this.waiting.keys()));
        return [];
      }
    }
    return this._settle(signed);
  }

  async retry(step) {
    for (const signed of [...this.waiting.values()]) {
      if (signed.step - signed.cover > step || step >= signed.step) continue;
      let complete = true;
      for (let s = signed.step - signed.cover; s < signed.step; s++) complete &&= this.shown.has(s);
      if (!complete) continue;
      this.waiting.delete(signed.step);
      return this._settle(signed);
    }
    return [];
  }

  async _settle(signed) {
    const steps = [];
    for (let s = signed.step - signed.cover; s < signed.step; s++) steps.push(s);
    const choices = steps.map((s) => [this.shown.get(s), ...(this.others.get(s) ?? [])]);
    let found = null;
    for (const combo of combinations(choices, MAX_COVER_TRIES)) {
      const aad = concat(signed.aad, await coverageDigest(combo));
      if (await opens(signed.key, signed.step, signed.sealed, aad)) { found = combo; break; }
    }
    const out = [];
    if (found === null) {
      out.push({ steps, verdict: "forged", pinpointed: false });
    } else {
      const good = steps.filter((s, i) => equal(found[i], this.shown.get(s)));
      const bad = steps.filter((s, i) => !equal(found[i], this.shown.get(s)));
      if (good.length) out.push({ steps: good, verdict: "verified", pinpointed: true });
      if (bad.length) out.push({ steps: bad, verdict: "forged", pinpointed: true });
    }
    for (const s of steps) this._forget(s);
    return out;
  }

  _forget(step) {
    this.shown.delete(step);
    this.keys.delete(step);
    this.others.delete(step);
  }
}
