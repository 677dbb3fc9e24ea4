// The gateway: its HTTP API (session cookie) and the /ws bridge, which relays what this
// browser sealed and streams envelopes, grants, rosters and presence (gateway/_ws.py).

import { b64, fromB64, utf8 } from "./bytes.js";
import { ed25519Sign } from "./crypto.js";

export class HttpError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
  }
}

export async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const data = r.status === 204 ? null : await r.json().catch(() => null);
  if (!r.ok) throw new HttpError(r.status, data?.detail ?? data?.error);
  return data;
}

// Claim this browser's participant for the logged-in account, proving it holds the
// identity key (gateway/_api.py, add_participant): the key signs a single-use challenge
// together with this page's origin, the account and the pid. location.origin is the
// origin the browser reached, so a look-alike site that relays challenges gets nothing
// it could use here (it cannot reach this origin's keys anyway).
export async function claimParticipant(identity) {
  const { challenge, account } = await api("POST", "/v1/me/participants/challenge", {});
  const signed = utf8(`fieldchat-claim-v1\n${location.origin}\n${account}\n${identity.pid}\n${challenge}`);
  const signature = await ed25519Sign(identity.edPrivate, signed);
  return api("POST", "/v1/me/participants", { bundle: b64(identity.bundle), challenge, signature: b64(signature) });
}

const PING_MS = 25000;
const BACKOFF_MIN_MS = 250;
const BACKOFF_MAX_MS = 8000;
const PUBLISH_TIMEOUT_MS = 20000;

// One WebSocket at a time, reconnected with bounded exponential backoff while wanted.
export class Bridge {
  constructor({ onFrame, onState, cursors }) {
    this.onFrame = onFrame;
    this.onState = onState;
    this.cursors = cursors; // () => {cursor, grantCursor}
    this.ws = null;
    this.wanted = false;
    this.backoff = BACKOFF_MIN_MS;
    this.pending = new Map(); // publish id -> {resolve, reject, timer}
    this.next = 1;
    this.timer = null;
  }

  get open() { return this.ws?.readyState === WebSocket.OPEN; }

  start() {
    this.wanted = true;
    if (!this.ws) this._connect();
  }

  stop() {
    this.wanted = false;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000);
  }

  _frame(frame) {
    if (frame === null || typeof frame !== "object") return;
    if (frame.op === "ack" || frame.op === "error") {
      const waiting = this.pending.get(frame.id);
      if (waiting) {
        this.pending.delete(frame.id);
        clearTimeout(waiting.timer);
        if (frame.op === "ack") waiting.resolve();
        else waiting.reject(Object.assign(new Error(frame.detail || frame.reason), { reason: frame.reason }));
        return;
      }
    }
    this.onFrame(frame);
  }

  _connect() {
    const { cursor, grantCursor } = this.cursors();
    const q = new URLSearchParams();
    if (cursor !== null && cursor !== undefined) q.set("cursor", cursor);
    q.set("grant_cursor", grantCursor || 0);
    q.set("batch", "1"); // several frames may come as one JSON array (gateway/_ws.py)
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/ws?${q}`);
    this.ws = ws;
    this.onState("connecting");
    let ping = null;
    ws.onopen = () => {
      this.backoff = BACKOFF_MIN_MS;
      ping = setInterval(() => this._send({ op: "ping" }), PING_MS);
    };
    ws.onmessage = (event) => {
      let parsed;
      try { parsed = JSON.parse(event.data); } catch { return; }
      for (const frame of Array.isArray(parsed) ? parsed : [parsed]) this._frame(frame);
    };
    ws.onclose = (event) => {
      clearInterval(ping);
      if (this.ws === ws) this.ws = null;
      for (const [, w] of this.pending) {
        clearTimeout(w.timer);
        w.reject(Object.assign(new Error("disconnected"), { reason: "transport" }));
      }
      this.pending.clear();
      this.onState(event.code === 4401 ? "unauthenticated" : "offline");
      if (this.wanted && event.code !== 4401) {
        this.timer = setTimeout(() => { if (this.wanted && !this.ws) this._connect(); }, this.backoff);
        this.backoff = Math.min(this.backoff * 2, BACKOFF_MAX_MS);
      }
    };
  }

  _send(frame) {
    if (!this.open) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  // Resolves on the gateway's ack (after the broker's PUBACK); rejects with `reason`.
  publish(kind, data, extra = {}) {
    return new Promise((resolve, reject) => {
      const id = `p${this.next++}`;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(Object.assign(new Error("no acknowledgement"), { reason: "transport" }));
      }, PUBLISH_TIMEOUT_MS);
      this.pending.set(id, { resolve, reject, timer });
      if (!this._send({ op: "publish", id, kind, data: b64(data), ...extra })) {
        this.pending.delete(id);
        clearTimeout(timer);
        reject(Object.assign(new Error("offline"), { reason: "transport" }));
      }
    });
  }
}

export { fromB64 };
