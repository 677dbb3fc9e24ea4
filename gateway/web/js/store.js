// IndexedDB: the engine's key-value state (identity CryptoKeys, chains, rosters, bundles),
// the decrypted messages and the outbox. One database per account name.
//
// Why decrypted copies: chain keys are deleted as chains advance (forward secrecy), so an
// envelope opened once cannot be opened again after a reload; like Signal or the Python
// device's SQLite, the participant keeps what it has read.

const VERSION = 1;

function promised(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

export async function openStore(account) {
  const request = indexedDB.open(`fieldchat:${account}`, VERSION);
  request.onupgradeneeded = () => {
    const db = request.result;
    db.createObjectStore("kv");
    db.createObjectStore("messages", { keyPath: "id" }).createIndex("cid", "cid");
    db.createObjectStore("outbox", { keyPath: "n", autoIncrement: true });
  };
  return new Store(await promised(request));
}

export class Store {
  constructor(db) { this.db = db; }

  _tx(name, mode = "readonly") { return this.db.transaction(name, mode).objectStore(name); }

  // The engine's store interface (same as MemoryStore below).
  get(key) { return promised(this._tx("kv").get(key)); }
  put(key, value) { return promised(this._tx("kv", "readwrite").put(value, key)); }
  delete(key) { return promised(this._tx("kv", "readwrite").delete(key)); }
  async entries(prefix) {
    const range = IDBKeyRange.bound(prefix, `${prefix}\uffff`);
    const store = this._tx("kv");
    const [keys, values] = await Promise.all([promised(store.getAllKeys(range)), promised(store.getAll(range))]);
    return keys.map((k, i) => [k, values[i]]);
  }

  message(id) { return promised(this._tx("messages").get(id)); }
  putMessage(m) { return promised(this._tx("messages", "readwrite").put(m)); }
  messagesOf(cid) { return promised(this._tx("messages").index("cid").getAll(cid)); }

  outbox() { return promised(this._tx("outbox").getAll()); }
  queue(item) { return promised(this._tx("outbox", "readwrite").add(item)); }
  update(item) { return promised(this._tx("outbox", "readwrite").put(item)); }
  unqueue(n) { return promised(this._tx("outbox", "readwrite").delete(n)); }

  close() { this.db.close(); }
}

// A store that keeps everything in memory (vector checks, tests); IndexedDB has the same API.
export class MemoryStore {
  constructor() { this.map = new Map(); }
  async get(key) { return this.map.get(key); }
  async put(key, value) { this.map.set(key, structuredClone(value)); }
  async delete(key) { this.map.delete(key); }
  async entries(prefix) {
    return [...this.map].filter(([k]) => k.startsWith(prefix)).map(([k, v]) => [k, structuredClone(v)]);
  }
}
