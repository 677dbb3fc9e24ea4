// Receiving chains (device/chains.py; PROTOCOL.md §6.4): a chain granted by another
// member, its window of skipped keys, and a cache of keys derived ahead of it.
//
// Work before authentication is bounded: an unsigned envelope gets at most
// MAX_UNSIGNED_JUMP chain steps derived for it (a signed one is verified before any).
// Keys derived on the way are cached every MARK_EVERY steps (`marks`), at most
// MAX_FORWARD_JUMP ahead: junk can make a receiver derive that far once per chain
// position, then any envelope costs at most MARK_EVERY steps; an honest sender far ahead
// is reached MAX_UNSIGNED_JUMP steps per envelope it sends. State moves only after
// AES-GCM has authenticated the envelope (the marks are a cache of what the key gives).

import { protocolError } from "./bytes.js";
import { aeadOpen, stepNonce } from "./crypto.js";
import { chainStep } from "./sha512.js";

export const MAX_SKIPPED_KEYS = 2000; // per chain, as libsignal's MAX_MESSAGE_KEYS
export const MAX_FORWARD_JUMP = 25000; // as libsignal's MAX_FORWARD_JUMPS
export const MAX_UNSIGNED_JUMP = 512; // ≈ 1.2 ms of chain steps in Chromium here (docs/web.md)
export const MARK_EVERY = 64;

// Chain steps derived by receiving chains, all together: the work envelopes cost before
// and after they authenticate (tests/web count it; time depends on the machine).
export const derived = { steps: 0 };

const derive = (ck) => { derived.steps++; return chainStep(ck); };
const next = (ck) => derive(ck).slice(32);

export class RecvChain {
  // `record`: what the store keeps (marks are never persisted: a cache).
  constructor({ epoch, sender, chain, step, key, signer, skipped = new Map(), evicted = -1 }) {
    Object.assign(this, { epoch, sender, chain, step, key, signer, skipped, evicted });
    this.marks = []; // [step, chain key], ascending, contiguous from `step`
  }

  get record() {
    const { epoch, sender, chain, step, key, signer, skipped, evicted } = this;
    return { epoch, sender, chain, step, key, signer, skipped, evicted };
  }

  // The furthest step an unsigned envelope can be tried at now: one refused as
  // `unsigned_jump` is worth trying again once this passes its step.
  reach() {
    const last = this.marks.length ? this.marks[this.marks.length - 1][0] : 0;
    return Math.max(this.step, last) + MAX_UNSIGNED_JUMP;
  }

  // The plaintext of `step`, or null when it was opened already. `authenticated`: its
  // signature verified, so it may jump MAX_FORWARD_JUMP steps. Throws `forward_jump`,
  // `unsigned_jump` (a missing key: hold it until reach() passes it; the cache moved
  // towards it), `old_step`, or CryptoError. `aead(key, nonce, sealed, aad)`: how the
  // message key opens it (aeadOpen; engine.js passes one that also keeps the key, §6.5).
  async open(step, sealed, aad, authenticated, aead = aeadOpen) {
    if (step === this.step) {
      const out = derive(this.key);
      const plaintext = await aead(out.subarray(0, 32), stepNonce(step), sealed, aad);
      this.key = out.slice(32);
      this.step = step + 1;
      this._dropMarks();
      return plaintext;
    }
    if (step > this.step) return this._openAhead(step, sealed, aad, authenticated, aead);
    const key = this.skipped.get(step);
    if (!key) {
      if (step <= this.evicted) throw protocolError("old_step", `step ${step} is older than the window`);
      return null; // a duplicate
    }
    const plaintext = await aead(derive(key).subarray(0, 32), stepNonce(step), sealed, aad);
    this.skipped.delete(step);
    return plaintext;
  }

  async _openAhead(step, sealed, aad, authenticated, aead) {
    const jump = step - this.step;
    if (jump > MAX_FORWARD_JUMP) throw protocolError("forward_jump", `step ${step} is ${jump} ahead`);
    const [base, baseKey] = this._keyBefore(step);
    if (!authenticated && step - base > MAX_UNSIGNED_JUMP) {
      this._push(step);
      throw protocolError("unsigned_jump", `unsigned step ${step} is ${jump} ahead of the chain ` +
                          `(at most ${MAX_UNSIGNED_JUMP} derived before authentication)`);
    }
    const low = Math.max(this.step, step - MAX_SKIPPED_KEYS); // the window keeps these
    let passed = [];
    let ck = baseKey;
    for (let s = base; s < step; s++) {
      if (s >= low) passed.push([s, ck]);
      if (s % MARK_EVERY === 0 && s > base) this._mark(s, ck); // junk aimed here costs ≤ 64 steps
      ck = next(ck);
    }
    const out = derive(ck);
    const plaintext = await aead(out.subarray(0, 32), stepNonce(step), sealed, aad);
    // Authenticated from here on.
    if (base > low) passed = this._keys(low, base).concat(passed);
    for (const [s, k] of passed) this.skipped.set(s, k);
    if (low > this.step) this.evicted = Math.max(this.evicted, low - 1);
    for (const oldest of this.skipped.keys()) {
      if (this.skipped.size <= MAX_SKIPPED_KEYS) break;
      this.skipped.delete(oldest);
      this.evicted = Math.max(this.evicted, oldest);
    }
    this.key = out.slice(32);
    this.step = step + 1;
    this._dropMarks();
    return plaintext;
  }

  // The known chain key nearest at or below `step`: [its step, key].
  _keyBefore(step) {
    const marks = this.marks;
    let lo = 0, hi = marks.length;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (marks[mid][0] <= step) lo = mid + 1; else hi = mid; }
    if (lo && marks[lo - 1][0] >= this.step) return marks[lo - 1];
    return [this.step, this.key];
  }

  // [step, chain key] of the steps low..high-1 (after authentication).
  _keys(low, high) {
    let [s, ck] = this._keyBefore(low);
    const out = [];
    for (; s < high; s++) {
      if (s >= low) out.push([s, ck]);
      ck = next(ck);
    }
    return out;
  }

  _mark(step, ck) {
    const marks = this.marks;
    let i = marks.length;
    while (i && marks[i - 1][0] > step) i--;
    if (!i || marks[i - 1][0] !== step) marks.splice(i, 0, [step, ck]);
  }

  // Extend the cache towards `step` by at most MAX_UNSIGNED_JUMP steps, never past
  // MAX_FORWARD_JUMP ahead of the chain. Every envelope out of reach extends it, whatever
  // step it names: a step remembered as "already tried" would let one forged envelope far
  // ahead keep an honest sender's later ones out of reach for good.
  _push(step) {
    let [base, ck] = this.marks.length ? this.marks[this.marks.length - 1] : [this.step, this.key];
    const end = Math.min(base + MAX_UNSIGNED_JUMP, step, this.step + MAX_FORWARD_JUMP);
    for (let s = base; s <= end; s++) {
      if (s % MARK_EVERY === 0 && s > base) this.marks.push([s, ck]);
      if (s < end) ck = next(ck);
    }
  }

  _dropMarks() {
    let i = 0;
    while (i < this.marks.length && this.marks[i][0] < this.step) i++;
    if (i) this.marks.splice(0, i);
  }
}
