// A browser participant for the interop tests: the page's engine behind a hex API that
// Python drives through Playwright (the bytes travel through the test, as over a broker).

import { fromHex, hex } from "/js/bytes.js";
import { Engine, MemoryStore } from "/js/engine.js";
import { decodeDelivery, decodeGrant } from "/js/grants.js";
import { isDelivery } from "/js/wire.js";

const pubs = (list) => list.map((p) => ({ kind: p.kind, recipient: p.recipient ?? null, cid: p.cid ?? null, data: hex(p.data) }));
const refusal = (err) => ({ error: err.reason ?? err.name });
const policyOf = (p) => (p ? { signEvery: p.sign_every ?? 1, compress: false, pad: false, requirePq: p.require_pq ?? true } : null);

export async function create() {
  const engine = await Engine.open(new MemoryStore());
  const opened = (o) => (o ? { sender: o.sender, text: o.message.text ?? null, kind: o.message.kind } : null);
  const peer = {
    engine,
    pid: engine.pid,
    bundle: hex(engine.bundle),
    postQuantum: engine.postQuantum,
    learnBundle: async (h) => (await engine.learnBundle(fromHex(h))).status,
    handleRoster: async (h) => pubs(await engine.handleRoster(fromHex(h))),
    // {publications} or {error: reason}: a refused or held roster is an answer here.
    tryRoster: async (h) => {
      try { return { publications: pubs(await engine.handleRoster(fromHex(h))) }; } catch (err) { return refusal(err); }
    },
    handleGrant: async (h) => {
      const r = await engine.handleGrant(fromHex(h));
      return { installed: r.installed, needsRoster: !!r.needsRoster, publications: pubs(r.publications ?? []) };
    },
    grantEnds: async (h) => (await engine.handleGrant(fromHex(h))).ends,
    inbox: async (h) => {
      try {
        const r = await engine.handleInbox(fromHex(h));
        return r.roster ? { publications: pubs(r.publications) }
          : { installed: r.installed, ends: r.ends, publications: pubs(r.publications ?? []) };
      } catch (err) { return refusal(err); }
    },
    mlkem: async () => (await import("/js/crypto.js")).mlkemSupported(),
    // The current prekey's ML-KEM private key: a CryptoKey whose bytes script cannot read.
    kemKey: async () => {
      const k = engine.identity.prekeys[engine.identity.prekeys.length - 1].kPrivate;
      return k ? { type: k.type, extractable: k.extractable, algorithm: k.algorithm.name } : null;
    },
    grantMode: async (h) => (isDelivery(fromHex(h)) ? decodeDelivery(fromHex(h)) : await decodeGrant(fromHex(h))).mode,
    update: async () => pubs(await engine.update()),
    answerUpdates: async () => pubs(await engine.answerUpdates()),
    keyed: async (cid) => engine.keyed(cid),
    create: async (members) => {
      const { cid, publications } = await engine.createConversation(members);
      return { cid, publications: pubs(publications) };
    },
    createWith: async ([members, policy]) => {
      const { cid, publications } = await engine.createConversation(members, { policy: policyOf(policy) });
      return { cid, publications: pubs(publications) };
    },
    // {cid, publications} or {error: reason}: the default policy may refuse the members.
    tryCreate: async (members) => {
      try {
        const { cid, publications } = await engine.createConversation(members);
        return { cid, publications: pubs(publications) };
      } catch (err) { return { ...refusal(err), message: err.message }; }
    },
    conversations: async () => engine.conversations(),
    counters: async () => ({ ...engine.counters }),
    takeSettled: async () => engine.takeSettled().map((d) => [d.steps, d.verdict, d.pinpointed]),
    pending: async ([cid, h]) => {
      try { return !!(await engine.open(cid, fromHex(h)))?.pending; } catch (err) { return refusal(err); }
    },
    remove: async ([cid, pids]) => pubs(await engine.removeMembers(cid, pids)),
    add: async ([cid, pids]) => pubs(await engine.addMembers(cid, pids)),
    seal: async ([cid, text]) => hex((await engine.seal(cid, { kind: 1, sentAt: 1700000000, text })).data),
    reach: async ([cid, epoch, sender, chain]) => engine.reach(cid, epoch, sender, chain),
    open: async ([cid, h]) => {
      try { return opened(await engine.open(cid, fromHex(h))); } catch (err) { return refusal(err); }
    },
    // Open `h` and say what it cost before the answer: chain steps derived and ms.
    openCounted: async ([cid, h]) => {
      const chains = await import("/js/chains.js").catch(() => ({ derived: { steps: NaN } }));
      const data = fromHex(h);
      const before = chains.derived.steps;
      const start = performance.now();
      let answer;
      try { answer = opened(await engine.open(cid, data)); } catch (err) { answer = refusal(err); }
      return { answer, ms: performance.now() - start, steps: chains.derived.steps - before };
    },
  };
  globalThis.peer = peer;
  return { pid: peer.pid, bundle: peer.bundle, postQuantum: peer.postQuantum };
}
