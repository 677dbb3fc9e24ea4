// Delayed authentication (device/_coverage.py, _opener.py, _sealer.py; PROTOCOL.md §6.5):
// unsigned messages pending until the sender's next signed envelope, whose tag covers
// their digests, settles them "verified" or "forged". Bounded as in Python. engine.js
// imports this module only for conversations that sign every Nth step.

import { CryptoError, concat, equal } from "./bytes.js";
import { aeadOpen, sha256, stepNonce } from "./crypto.js";

export const MAX_COVER = 1023;
export const MAX_PENDING = MAX_COVER;
export const MAX_OTHERS = 16;
export const MAX_WAITING = 4;
export const MAX_COVER_TRIES = 64;

const LABEL = new TextEncoder().encode("fieldchat coverage v1");

// The plaintext of a signed envelope whose signature verified, without its tag: AES-GCM's
// counter-mode part alone (NIST SP 800-38D §7.2, counter from nonce || 00000002). The
// signature authenticates these bytes; the tag, whose associated data ends with the digest
// of the envelopes it covers, is checked apart, once they are here (PROTOCOL.md §6.5).
async function aeadDecryptSigned(key, nonce, sealed) {
  if (sealed.length < 16) throw new CryptoError();
  const k = await globalThis.crypto.subtle.importKey("raw", key, "AES-CTR", false, ["decrypt"]);
  const counter = concat(nonce, Uint8Array.of(0, 0, 0, 2));
  const body = sealed.subarray(0, sealed.length - 16);
  return new Uint8Array(await globalThis.crypto.subtle.decrypt({ name: "AES-CTR", counter, length: 32 }, k, body));
}

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

// engine.seal: what our next envelope covers ({cover, digest} when signed; `add` the
// envelope when not), per conversation in `map`; a new chain or skipped steps start over.
export async function covering(map, cid, chain, step, signed) {
  let c = map.get(cid);
  if (!c || c.chain !== chain || c.next !== step) map.set(cid, c = { chain, next: step, digests: [] });
  c.next = step + 1;
  if (!signed) return { add: async (body) => { c.digests.push(await envelopeDigest(body)); } };
  const out = { cover: c.digests.length, digest: await coverageDigest(c.digests) };
  c.digests = [];
  return out;
}

// engine._open for a covering signed or a covered unsigned envelope: its plaintext, null
// (a duplicate) or undefined (another candidate of a pending step, kept if authentic).
export async function openCovered(engine, cid, key, h, sender, chain, data, sealed, aad) {
  const where = `${cid}/${key}`;
  let coverage = engine.coverage.get(where);
  if (!coverage) engine.coverage.set(where, coverage = new ChainCoverage());
  const settle = (done) => {
    for (const { steps, verdict, pinpointed } of done) {
      engine.counters[`coverage_${verdict}`] = (engine.counters[`coverage_${verdict}`] || 0) + steps.length;
      engine.settled.push({ cid, sender, epoch: h.epoch, senderIndex: h.sender, chain: h.chain, steps, verdict, pinpointed });
    }
  };
  if (!h.cover && coverage.pending(h.step)) {
    if (await coverage.candidate(h.step, await envelopeDigest(data), sealed, aad)) {
      engine.count("candidate_kept");
      settle(await coverage.retry(h.step));
    } else {
      engine.count("duplicate");
    }
    return undefined;
  }
  let messageKey = null;
  const aead = async (k, n, s, a) => {
    messageKey = k;
    return h.cover ? aeadDecryptSigned(k, n, s) : aeadOpen(k, n, s, a);
  };
  const plaintext = await chain.open(h.step, sealed, aad, !!h.cover, aead);
  if (plaintext !== null) {
    settle(h.cover ? await coverage.signed(h.step, h.cover, messageKey, sealed, aad)
                   : await coverage.unsigned(h.step, await envelopeDigest(data), messageKey));
  }
  return plaintext;
}
