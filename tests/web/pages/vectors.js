// Checks tests/vectors/protocol.json with the browser's own code (PROTOCOL.md §9).
// Returns one {name, ok, detail} per check; the Python test asserts them all.

import * as bytes from "/js/bytes.js";
import {
  chainStep, hybridOpen, hybridSeal, importMlkemSeed, importPrivate, mlkemSupported, publicOfPrivate, sha256, stepNonce,
} from "/js/crypto.js";
import * as engineModule from "/js/engine.js";
import { Engine, MemoryStore, identityFromSeed } from "/js/engine.js";
import * as keying from "/js/grants.js";
import { pack, unpack } from "/js/msgpack.js";
import * as wireModule from "/js/wire.js";

const { fromHex, hex, equal } = bytes;
// The wire format: wire.js, and the deliveries and grants of the lazily loaded grants.js.
const wire = { ...wireModule, ...keying };
const { acceptGrant, chainKey, epochCommit, makeDelivery, openDelivery } = keying;
const CLOCK = 1700000000;
// A vector identity: its key from the seed, its first prekey as recorded (prekeys are
// drawn, never derived from the seed: PROTOCOL.md §2.4).
const ident = (vec) => identityFromSeed(fromHex(vec.seed), CLOCK, fromHex(vec.prekey_x25519_private),
                                       { mlkemSeed: vec.prekey_mlkem_seed ? fromHex(vec.prekey_mlkem_seed) : null });

export async function check(v) {
  const results = [];
  const run = async (name, fn) => {
    try {
      const detail = await fn();
      results.push({ name, ok: detail === true, detail: detail === true ? "" : String(detail) });
    } catch (err) {
      results.push({ name, ok: false, detail: `${err.name}: ${err.message}` });
    }
  };
  const expectError = async (fn, cls, reason) => {
    try { await fn(); } catch (err) {
      if (err instanceof cls && (!reason || err.reason === reason)) return true;
      return `wrong error ${err.name} ${err.reason} ${err.message}`;
    }
    return "no error";
  };

  for (const id of v.identities) {
    await run(`identity ${id.name}: bundle decodes, pid, fingerprint, canonical bytes`, async () => {
      const b = await wire.decodeBundle(fromHex(id.bundle));
      if (b.pid !== id.pid) return `pid ${b.pid}`;
      if ((await wire.fingerprint(b)) !== id.fingerprint) return "fingerprint";
      if (b.postQuantum !== id.post_quantum) return "post_quantum";
      if (b.prekey.id !== id.prekey_id || hex(b.prekey.x25519) !== id.prekey_x25519_public) return "prekey";
      const again = bytes.concat(wire.bundleBody(b.ed25519, b.createdAt, b.prekey), b.signature);
      return equal(again, fromHex(id.bundle)) || "re-encoded bundle differs";
    });
    await run(`identity ${id.name}: the identity key from the seed, the prekey from its private key`, async () => {
      const okm = await (await import("/js/crypto.js")).hkdf(fromHex(id.seed), null, bytes.utf8("fieldchat identity v2"), 32);
      const ed = await publicOfPrivate("ed25519", okm.slice(0, 32));
      const x = await publicOfPrivate("x25519", fromHex(id.prekey_x25519_private));
      return (hex(ed) === id.ed25519_public && hex(x) === id.prekey_x25519_public) || "derived keys differ";
    });
  }
  await run("ML-KEM-768: this browser has it in WebCrypto", async () => (await mlkemSupported()) || "no ML-KEM-768");
  await run("identity web_pq: the browser rebuilds the exact bundle, ML-KEM-768 key included", async () => {
    const web = v.identities.find((i) => i.name === "web_pq");
    const rebuilt = await ident(web);
    if (!rebuilt.postQuantum || rebuilt.prekeys[0].kPrivate.extractable) return "ML-KEM key missing or extractable";
    return (rebuilt.pid === web.pid && hex(rebuilt.bundle) === web.bundle) || "bundle differs";
  });
  await run("identity web: the browser rebuilds the exact bundle from the seed", async () => {
    const web = v.identities.find((i) => i.name === "web");
    const rebuilt = await ident(web);
    return (rebuilt.pid === web.pid && hex(rebuilt.bundle) === web.bundle) || "bundle differs";
  });

  for (const c of v.chain) {
    await run(`chain step ${c.step}`, async () => {
      const out = await chainStep(fromHex(c.chain_key));
      if (hex(out) !== c.hmac_sha512) return "hmac";
      if (hex(out.subarray(0, 32)) !== c.message_key || hex(out.subarray(32)) !== c.next_chain_key) return "split";
      return hex(stepNonce(c.step)) === c.nonce || "nonce";
    });
  }

  for (const conv of v.conversations) {
    await run(`roster ${conv.label}: verifies, founds its cid, re-encodes canonically`, async () => {
      const r = await wire.decodeRoster(fromHex(conv.roster));
      await wire.verifyRosterChain(r, null);
      if (r.cid !== conv.cid) return "cid";
      const again = bytes.concat(wire.rosterBody(r), r.signature);
      return equal(again, fromHex(conv.roster)) || "re-encoded roster differs";
    });
  }

  for (const conv of v.conversations) {
    await run(`key schedule ${conv.label}: the secret gives the roster's commit and every chain 0`, async () => {
      const r = await wire.decodeRoster(fromHex(conv.roster));
      const secret = fromHex(conv.epoch_secret);
      if (hex(await epochCommit(secret, bytes.decodeId(conv.cid), r.epoch)) !== conv.commit) return "commit";
      if (hex(r.commit) !== conv.commit) return "roster commit";
      for (const [i, key] of conv.chain_keys.entries()) {
        if (hex(await chainKey(secret, r.digest, i)) !== key) return `chain ${i}`;
      }
      return true;
    });
  }

  const xd = v.deliveries.find((d) => d.mode === "x25519");
  await run("X25519 delivery: web opens the epoch secret; the browser re-creates it byte for byte", async () => {
    const webVec = v.identities.find((i) => i.name === "web");
    const web = await ident(webVec);
    const d = wire.decodeDelivery(fromHex(xd.delivery));
    if (d.cid !== xd.cid || d.epoch !== xd.epoch || d.prekeyId !== webVec.prekey_id) return "fields";
    if (hex(await openDelivery(web, d)) !== xd.epoch_secret) return "secret";
    const eph = { privateKey: await importPrivate("x25519", fromHex(xd.ephemeral_private)),
                  publicRaw: await publicOfPrivate("x25519", fromHex(xd.ephemeral_private)) };
    const alice = await ident(v.identities.find((i) => i.name === "alice"));
    const made = await makeDelivery(alice, fromHex(xd.epoch_secret), await wire.decodeBundle(fromHex(webVec.bundle)),
                                    xd.cid, xd.epoch, eph);
    return hex(made) === xd.delivery || "re-created delivery differs";
  });
  await run("hybrid delivery: decodes; the browser (no ML-KEM) cannot open one", async () => {
    const hd = v.deliveries.find((d) => d.mode === "hybrid" && d.recipient === "bob");
    const d = wire.decodeDelivery(fromHex(hd.delivery));
    if (d.mode !== wire.GRANT_MODE.hybrid || d.kemCiphertext.length !== 1088) return "mode";
    const web = await ident(v.identities.find((i) => i.name === "web"));
    return expectError(() => openDelivery(web, { ...d, prekeyId: web.prekeys[0].id }), bytes.ProtocolError, "grant");
  });
  await run("hybrid delivery: the browser with ML-KEM-768 (web_pq) opens Python's hybrid delivery", async () => {
    const hd = v.deliveries.find((d) => d.mode === "hybrid" && d.recipient === "web_pq");
    const web = await ident(v.identities.find((i) => i.name === "web_pq"));
    return hex(await openDelivery(web, wire.decodeDelivery(fromHex(hd.delivery)))) === hd.epoch_secret || "secret";
  });

  for (const e of v.envelopes) {
    await run(`envelope ${e.conversation} step ${e.step}: opens with the chain key alone`, async () => {
      const conv = v.conversations.find((c) => c.label === e.conversation);
      const data = fromHex(e.envelope);
      const h = wire.readHeader(data);
      if (h.epoch !== e.epoch || h.sender !== e.sender_index || h.chain !== e.chain || h.step !== e.step) return "header";
      if (h.kind !== e.kind || h.flags !== e.flags || hex(data.subarray(0, h.headerLength)) !== e.header) return "kind/flags";
      let ck = fromHex(conv.sender_chain_key);
      for (let i = 0; i < h.step; i++) ck = (await chainStep(ck)).slice(32);
      const mk = (await chainStep(ck)).subarray(0, 32);
      const end = data.length - (h.flags & wire.FLAG.signed ? 64 : 0);
      const { aeadOpen } = await import("/js/crypto.js");
      const pt = await aeadOpen(mk, stepNonce(h.step), data.subarray(h.headerLength, end),
                                bytes.concat(data.subarray(0, h.headerLength), bytes.decodeId(e.cid), fromHex(e.coverage)));
      if (h.cover !== e.cover) return "cover";
      const m = await wire.decodePlaintext(h.kind, pt, { compressed: !!(h.flags & 0x40), padded: !!(h.flags & 0x20) });
      return (m.text === e.message.text && m.sentAt === e.message.sent_at) || "message differs";
    });
  }

  for (const conv of v.conversations) {
    await run(`engine of web opens every envelope of ${conv.label} after its X25519 delivery`, async () => {
      const webVec = v.identities.find((i) => i.name === "web");
      const alice = v.identities.find((i) => i.name === "alice");
      const engine = await Engine.open(new MemoryStore(), { identity: await ident(webVec) });
      await engine.learnBundle(fromHex(alice.bundle));
      const replies = await engine.handleRoster(fromHex(conv.roster));
      // web is a member, not the admin who drew the epoch's secret: it sends nothing.
      if (replies.length) return "publications";
      const result = await engine.handleGrant(fromHex(conv.delivery_to_web_x25519));
      if (!result.installed) return "grant not installed";
      for (const e of v.envelopes.filter((x) => x.conversation === conv.label)) {
        const opened = await engine.open(conv.cid, fromHex(e.envelope));
        if (!opened || opened.message.text !== e.message.text || opened.sender !== e.sender_pid) return `step ${e.step}`;
        if (opened.signed !== !!(e.flags & 0x80)) return "signed flag";
      }
      // Delayed authentication (§6.5): what was pending is verified by the signed step.
      const settled = JSON.stringify(engine.takeSettled().map((d) => [d.steps, d.verdict]));
      if (settled !== (conv.label === "every_third" ? '[[[1,2],"verified"]]' : "[]")) return `settled ${settled}`;
      const again = await engine.open(conv.cid, fromHex(v.envelopes.find((x) => x.conversation === conv.label).envelope));
      if (again !== null) return "a replayed envelope opened twice";
      return engine.counters.duplicate === 1 || "duplicate not counted";
    });
  }

  await run("an envelope that overtakes earlier ones opens, and the earlier ones after it", async () => {
    const conv = v.conversations[0];
    const webVec = v.identities.find((i) => i.name === "web");
    const engine = await Engine.open(new MemoryStore(), { identity: await ident(webVec) });
    await engine.learnBundle(fromHex(v.identities[0].bundle));
    await engine.handleRoster(fromHex(conv.roster));
    await engine.handleGrant(fromHex(conv.delivery_to_web_x25519));
    const envs = v.envelopes.filter((x) => x.conversation === conv.label).reverse();
    for (const e of envs) {
      const opened = await engine.open(conv.cid, fromHex(e.envelope));
      if (!opened || opened.message.text !== e.message.text) return `step ${e.step}`;
    }
    return true;
  });

  await run("a delivery arriving before its roster is held and applied with the roster", async () => {
    const conv = v.conversations[1];
    const webVec = v.identities.find((i) => i.name === "web");
    const engine = await Engine.open(new MemoryStore(), { identity: await ident(webVec) });
    const held = await engine.handleGrant(fromHex(conv.delivery_to_web_x25519));
    if (!held.needsRoster) return "not held";
    await engine.handleRoster(fromHex(conv.roster));
    const e = v.envelopes.find((x) => x.conversation === conv.label);
    const opened = await engine.open(conv.cid, fromHex(e.envelope));
    return (opened && opened.message.text === e.message.text) || "not opened";
  });

  // The roster chain (§5.2): each case against the roster it follows, then through the
  // engine of a joiner listed at every epoch (bob's Ed25519 key: only the pid matters here).
  const chain = v.roster_chain;
  const decoded = [];
  for (const c of chain) decoded.push(await wire.decodeRoster(fromHex(c.roster)));
  for (const [i, c] of chain.entries()) {
    await run(`roster chain: ${c.why} (epoch ${decoded[i].epoch} after ${c.follows}) ${c.chains ? "chains" : "is refused"}`, async () => {
      const prev = c.follows >= 0 ? decoded[c.follows] : null;
      if (c.chains) { await wire.verifyRosterChain(decoded[i], prev); return true; }
      return expectError(() => wire.verifyRosterChain(decoded[i], prev), bytes.ProtocolError, "roster");
    });
  }
  const good = chain.filter((c) => c.chains).map((c) => fromHex(c.roster));
  const bad = chain.filter((c) => !c.chains).map((c) => fromHex(c.roster));
  const joiner = async () => {
    const bob = v.identities.find((i) => i.name === "bob");
    return Engine.open(new MemoryStore(), { identity: await ident(bob) });
  };
  await run("roster chain: a joiner holds epoch 2 (roster_pending, nothing granted) until 0 and 1 arrive", async () => {
    const engine = await joiner();
    const err = await expectError(() => engine.handleRoster(good[2]), bytes.ProtocolError, "roster_pending");
    if (err !== true) return err;
    if (engine.conversations().length) return "entered an unchained roster";
    await engine.handleRoster(good[0]);
    await engine.handleRoster(good[1]);
    const cid = v.conversations[0].cid;
    return (hex(engine.roster(cid).bytes) === chain[2].roster && engine.isMember(cid)) || "epoch 2 not adopted";
  });
  await run("roster chain: at epoch 1 a non-admin's epoch 2 and one naming epoch 0 are refused", async () => {
    const engine = await joiner();
    await engine.handleRoster(good[0]);
    await engine.handleRoster(good[1]);
    for (const data of bad) {
      const err = await expectError(() => engine.handleRoster(data), bytes.ProtocolError, "roster");
      if (err !== true) return err;
    }
    return engine.roster(v.conversations[0].cid).epoch === 1 || "moved";
  });
  await run("roster chain: held rosters that do not chain are dropped when the gap fills", async () => {
    const engine = await joiner();
    await engine.handleRoster(good[0]);
    for (const data of [...bad, good[2]]) {
      const err = await expectError(() => engine.handleRoster(data), bytes.ProtocolError, "roster_pending");
      if (err !== true) return err;
    }
    await engine.handleRoster(good[1]);
    const conv = engine.convs.get(v.conversations[0].cid);
    if (hex(conv.rosters.get(2).bytes) !== chain[2].roster) return "the genuine epoch 2 not adopted";
    return (engine.counters.roster === 2 && !conv.candidates.size) || JSON.stringify(engine.counters);
  });
  await run("limits: the browser's are the vectors'", async () => {
    const mine = {
      keep_epochs: engineModule.KEEP_EPOCHS, max_chain_ends: wire.MAX_CHAIN_ENDS,
      max_forward_jump: engineModule.MAX_FORWARD_JUMP, max_unsigned_jump: engineModule.MAX_UNSIGNED_JUMP,
      mark_every: engineModule.MARK_EVERY, max_cover: wire.MAX_COVER,
      max_cover_tries: (await import("/js/coverage.js")).MAX_COVER_TRIES,
    };
    return JSON.stringify(mine) === JSON.stringify(v.limits) || JSON.stringify(mine);
  });

  const x = v.grants.find((g) => g.mode === "x25519");
  await run("X25519 grant: web accepts it (a member's own re-keyed chain, §5.4)", async () => {
    const web = await ident(v.identities.find((i) => i.name === "web"));
    const payload = await acceptGrant(web, await wire.decodeGrant(fromHex(x.grant)));
    return equal(wire.chainGrantBytes(payload), fromHex(x.payload)) || "payload";
  });
  await run("chain grant: ends decode as stated and re-encode byte for byte", async () => {
    const p = wire.decodeChainGrant(fromHex(x.payload));
    if (JSON.stringify(p.ends) !== "[[2,0,17],[1,0,0]]") return JSON.stringify(p.ends);
    return hex(wire.chainGrantBytes(p)) === x.payload || "re-encoded payload differs";
  });
  await run("chain grant: the 6-element form, 5 ends, an end of a later epoch, an end twice are refused", async () => {
    const p = wire.decodeChainGrant(fromHex(x.payload));
    const raw = (ends) => pack([p.epoch, p.roster, p.sender, p.chain, p.step, p.key, ends]);
    const results = [
      await expectError(() => wire.decodeChainGrant(pack([p.epoch, p.roster, p.sender, p.chain, p.step, p.key])), bytes.WireError),
      await expectError(() => wire.decodeChainGrant(raw([[0, 0, 1], [1, 0, 1], [2, 0, 1], [0, 1, 1], [1, 1, 1]])), bytes.LimitExceeded),
      await expectError(() => wire.decodeChainGrant(raw([[3, 0, 1]])), bytes.WireError),
      await expectError(() => wire.decodeChainGrant(raw([[1, 0, 1], [1, 0, 2]])), bytes.WireError),
      await expectError(() => wire.decodeChainGrant(raw([[1, 0]])), bytes.WireError),
    ];
    return results.every((r) => r === true) || JSON.stringify(results);
  });
  await run("hybrid grant: signature verifies; a browser without ML-KEM cannot be its recipient", async () => {
    const h = v.grants.find((g) => g.mode === "hybrid");
    const grant = await wire.decodeGrant(fromHex(h.grant));
    if (grant.mode !== wire.GRANT_MODE.hybrid || grant.kemCiphertext.length !== 1088) return "mode";
    const webVec = v.identities.find((i) => i.name === "web");
    const web = await ident(webVec);
    return expectError(() => acceptGrant(web, { ...grant, recipient: web.pid }), bytes.ProtocolError, "grant");
  });
  await run("hybrid grant: the browser with ML-KEM-768 (web_pq) opens Python's hybrid grant", async () => {
    const h = v.grants.find((g) => g.mode === "hybrid" && g.recipient === "web_pq");
    const webVec = v.identities.find((i) => i.name === "web_pq");
    const web = await ident(webVec);
    const payload = await acceptGrant(web, await wire.decodeGrant(fromHex(h.grant)));
    return equal(wire.chainGrantBytes(payload), fromHex(h.payload)) || "payload";
  });
  for (const hk of v.hybrid_kem) {
    await run(`hybrid KEM ${hk.name}: opens to the plaintext, not under another context`, async () => {
      const vec = v.identities.find((i) => i.seed === hk.recipient_seed);
      const me = (await ident(vec)).prekeys[0];
      const message = { ephemeral: fromHex(hk.ephemeral), sealed: fromHex(hk.sealed),
                        kemCiphertext: hk.kem_ciphertext ? fromHex(hk.kem_ciphertext) : null };
      const opened = await hybridOpen(me, message, fromHex(hk.context));
      if (hex(opened) !== hk.plaintext) return "plaintext";
      const wrong = await expectError(() => hybridOpen(me, message, bytes.utf8("another context")), bytes.CryptoError);
      if (wrong !== true) return `another context: ${wrong}`;
      if (!hk.deterministic) return true;
      // X25519 only: fully deterministic, so the browser seals the same bytes.
      const eph = { privateKey: await importPrivate("x25519", fromHex(hk.ephemeral_private)),
                    publicRaw: await publicOfPrivate("x25519", fromHex(hk.ephemeral_private)) };
      const made = await hybridSeal({ x25519Public: fromHex(hk.x25519_public), context: fromHex(hk.context),
                                     plaintext: fromHex(hk.plaintext), ephemeral: eph });
      return (hex(made.ephemeral) === hk.ephemeral && hex(made.sealed) === hk.sealed) || "re-sealed bytes differ";
    });
  }

  // Refusals: each is a typed error, never a crash or a wrong plaintext.
  const signedEnv = fromHex(v.envelopes[0].envelope);
  const prepared = async () => {
    const conv = v.conversations[0];
    const webVec = v.identities.find((i) => i.name === "web");
    const engine = await Engine.open(new MemoryStore(), { identity: await ident(webVec) });
    await engine.learnBundle(fromHex(v.identities[0].bundle));
    await engine.handleRoster(fromHex(conv.roster));
    await engine.handleGrant(fromHex(conv.delivery_to_web_x25519));
    return [engine, conv.cid];
  };
  await run("a tampered ciphertext is refused opaquely and moves nothing", async () => {
    const [engine, cid] = await prepared();
    const bad = signedEnv.slice();
    bad[8] ^= 1;
    const err = await expectError(() => engine.open(cid, bad), bytes.CryptoError, "auth");
    if (err !== true) return err;
    return (await engine.open(cid, signedEnv))?.message.text === v.envelopes[0].message.text || "chain moved";
  });
  await run("a stripped signature is refused (policy signs every step)", async () => {
    const [engine, cid] = await prepared();
    const bad = signedEnv.slice(0, -64);
    bad[1] &= ~0x80;
    return expectError(() => engine.open(cid, bad), bytes.FieldchatError);
  });
  await run("an unknown version is UnsupportedVersion; a non-minimal varint is WireError", async () => {
    const v2 = signedEnv.slice(); v2[0] = 2;
    const a = await expectError(() => wire.readHeader(v2), bytes.UnsupportedVersion);
    const b = await expectError(() => bytes.readVarint(Uint8Array.of(0x80, 0x00), 0), bytes.WireError);
    const c = await expectError(() => unpack(Uint8Array.of(0x81, 0xa1, 0x61, 0x01)), bytes.WireError);
    const d = await expectError(() => unpack(Uint8Array.of(0x91, 0x01, 0x02)), bytes.WireError);
    return [a, b, c, d].every((r) => r === true) || JSON.stringify([a, b, c, d]);
  });
  await run("msgpack: canonical forms for every size class round-trip", async () => {
    const values = [0, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, 2 ** 40, -1, -32, -33,
                    -128, -129, -32768, -32769, -(2 ** 31), null, true, false, "", "x".repeat(31),
                    "x".repeat(32), "é".repeat(200), new Uint8Array(300), Array(15).fill(1), Array(16).fill(1)];
    for (const value of values) {
      const back = unpack(pack([value]))[0];
      const same = value instanceof Uint8Array ? equal(back, value) : JSON.stringify(back) === JSON.stringify(value);
      if (!same) return `value ${String(value).slice(0, 20)}`;
    }
    return hex(pack([1, "a", new Uint8Array([2]), null, [true]])) === "9501a161c40102c091c3" || "encoding";
  });
  await run("ids: base32 round trip and the self-certifying pid", async () => {
    const raw = fromHex("00112233445566778899aabbccddeeff");
    const id = bytes.encodeId(raw);
    return (bytes.isValidId(id) && equal(bytes.decodeId(id), raw)) || id;
  });
  await run("padding: Padmé lengths as Python computes them", async () => {
    const expected = { 1: 32, 32: 32, 33: 36, 100: 104, 1000: 1024, 5000: 5120, 30000: 30720 };
    for (const [n, want] of Object.entries(expected)) {
      if (wire.padmeLength(Number(n)) !== want) return `${n} -> ${wire.padmeLength(Number(n))}`;
    }
    return true;
  });
  return results;
}
