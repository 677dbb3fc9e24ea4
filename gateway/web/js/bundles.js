// The bundles an engine knows, by pid (as learn_bundle in device/engine.py): the identity
// key is the pid's, so a newer bundle is a rotated prekey (`updated`, §2.5) and one with an
// older prekey is ignored (no rollback); and the members whose fingerprint the user
// compared (`verified`). Stored as `bundle/{pid}` and `verified/{pid}`.

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

  // A pid's first bundle, then each newer prekey; an older prekey is ignored.
  async learn(data) {
    const bundle = await decodeBundle(data);
    const known = this.get(bundle.pid);
    const fp = await fingerprint(bundle);
    let status;
    if (!known) status = "new";
    else if (equal(known.bytes, bundle.bytes)) return { pid: bundle.pid, status: "same", fingerprint: fp };
    else if (bundle.prekey.id <= known.prekey.id) {
      return { pid: bundle.pid, status: "older", fingerprint: await fingerprint(known) };
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

  // The roster entries of `pids` (§5.1): each member's identity key, from its bundle;
  // `self` ({pid, key, postQuantum}: this browser) needs none. A policy that requires
  // post-quantum members admits none without an ML-KEM key, this browser included.
  members(self, pids, admins, policy) {
    return [...new Set(pids)].map((pid) => {
      const bundle = pid === self.pid ? { postQuantum: !!self.postQuantum, ed25519: self.key } : this.get(pid);
      if (!bundle) throw protocolError("unknown_participant", `no bundle known for ${pid}: fetch it first`);
      if (policy.requirePq && !bundle.postQuantum) {
        throw protocolError("not_member", pid === self.pid
          ? "this browser has no ML-KEM-768 key and the policy requires post-quantum members"
          : `${pid} has no ML-KEM key and the policy requires one`);
      }
      return { key: bundle.ed25519, pid, admin: admins.has(pid), pq: bundle.postQuantum };
    });
  }
}
