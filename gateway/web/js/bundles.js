// The bundles an engine knows, by pid (as learn_bundle in device/engine.py): trust on first
// use, a newer bundle with other keys accepted and reported loudly (`key_changed`, which
// also drops the mark), and the members whose fingerprint the user compared (`verified`).
// Stored as `bundle/{pid}` and `verified/{pid}`.

import { equal, protocolError } from "./bytes.js";
import { decodeBundle, fingerprint } from "./wire.js";

export class Bundles extends Map {
  constructor(store) {
    super();
    this.store = store;
    this.verified = new Set();
  }

  async load() {
    for (const [, data] of await this.store.entries("bundle/")) {
      const b = await decodeBundle(data);
      this.set(b.pid, b);
    }
    for (const [key] of await this.store.entries("verified/")) this.verified.add(key.slice(9));
  }

  // Trust on first use; a newer bundle with other keys is accepted and reported loudly.
  async learn(data) {
    const bundle = await decodeBundle(data);
    const known = this.get(bundle.pid);
    const fp = await fingerprint(bundle);
    let status;
    if (!known) status = "new";
    else if (equal(known.bytes, bundle.bytes)) return { pid: bundle.pid, status: "same", fingerprint: fp };
    else if (bundle.createdAt <= known.createdAt) {
      return { pid: bundle.pid, status: "older", fingerprint: await fingerprint(known) };
    } else if (!equal(known.x25519, bundle.x25519) || !equal(known.mlkem768 ?? new Uint8Array(0), bundle.mlkem768 ?? new Uint8Array(0))) {
      status = "key_changed";
      this.verified.delete(bundle.pid);
      await this.store.delete(`verified/${bundle.pid}`);
    } else status = "updated";
    this.set(bundle.pid, bundle);
    await this.store.put(`bundle/${bundle.pid}`, data);
    return { pid: bundle.pid, status, fingerprint: fp,
             previousFingerprint: known ? await fingerprint(known) : null };
  }

  async markVerified(pid) {
    if (!this.has(pid)) throw protocolError("unknown_participant", `no bundle known for ${pid}`);
    this.verified.add(pid);
    await this.store.put(`verified/${pid}`, true);
  }

  // The roster entries of `pids` (§5.1), from their bundles; `self` ({pid, postQuantum}:
  // this browser) needs none. A policy that requires post-quantum members admits none
  // without an ML-KEM key, this browser included.
  members(self, pids, admins, policy) {
    return [...new Set(pids)].map((pid) => {
      const bundle = pid === self.pid ? { postQuantum: !!self.postQuantum } : this.get(pid);
      if (!bundle) throw protocolError("unknown_participant", `no bundle known for ${pid}: fetch it first`);
      if (policy.requirePq && !bundle.postQuantum) {
        throw protocolError("not_member", pid === self.pid
          ? "this browser has no ML-KEM-768 key and the policy requires post-quantum members"
          : `${pid} has no ML-KEM key and the policy requires one`);
      }
      return { pid, admin: admins.has(pid), pq: bundle.postQuantum };
    });
  }
}
