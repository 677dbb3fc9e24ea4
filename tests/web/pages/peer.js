// A browser participant for the interop tests: the page's engine behind a hex API that
// Python drives through Playwright (the bytes travel through the test, as over a broker).

import { fromHex, hex } from "/js/bytes.js";
import { Engine, MemoryStore } from "/js/engine.js";
import { decodeGrant } from "/js/wire.js";

const pubs = (list) => list.map((p) => ({ kind: p.kind, recipient: p.recipient ?? null, data: hex(p.data) }));

export async function create() {
  const engine = await Engine.open(new MemoryStore());
  const peer = {
    engine,
    pid: engine.pid,
    bundle: hex(engine.bundle),
    learnBundle: async (h) => (await engine.learnBundle(fromHex(h))).status,
    handleRoster: async (h) => pubs(await engine.handleRoster(fromHex(h))),
    handleGrant: async (h) => {
      const r = await engine.handleGrant(fromHex(h));
      return { installed: r.installed, needsRoster: !!r.needsRoster };
    },
    grantMode: async (h) => (await decodeGrant(fromHex(h))).mode,
    create: async (members) => {
      const { cid, publications } = await engine.createConversation(members);
      return { cid, publications: pubs(publications) };
    },
    remove: async ([cid, pids]) => pubs(await engine.removeMembers(cid, pids)),
    add: async ([cid, pids]) => pubs(await engine.addMembers(cid, pids)),
    seal: async ([cid, text]) => hex((await engine.seal(cid, { kind: 1, sentAt: 1700000000, text })).data),
    open: async ([cid, h]) => {
      try {
        const o = await engine.open(cid, fromHex(h));
        return o ? { sender: o.sender, text: o.message.text ?? null, kind: o.message.kind } : null;
      } catch (err) {
        return { error: err.reason ?? err.name };
      }
    },
  };
  globalThis.peer = peer;
  return { pid: peer.pid, bundle: peer.bundle };
}
