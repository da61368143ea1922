// Read every array of an fkdstore store (format 4.0, crop regions) with zarrita, the JavaScript Zarr v3
// implementation, following spec/format-v4.md sections 2-4 without any fkdstore code:
//   * crc32c is VERIFIED (zarrita's own crc32c codec strips the 4 bytes without comparing them, which the
//     spec forbids): a registered codec overrides it and throws on a mismatch;
//   * float16 needs Float16Array (ES2025); without it the @petamoriken/float16 polyfill is installed when
//     present, else the script refuses float16 arrays (exit code 3) rather than misread them
//     (ZARRITA_CHECK_NO_POLYFILL=1 skips the polyfill);
//   * keys are decoded from the uint8 `key` array (cut at the first NUL, UTF-8, fatal on bad bytes);
//   * every manifest tag is recomputed (crc32c(store id + path + NUL + uint64le(c) + chunk bytes), partial
//     last chunk padded with the array's fill value) and compared with the stored `manifest` (one row per
//     shard: the shard's key, image_size and label chunks, then every inner chunk of every record array).
//     Seeded crops: `box` and `flip` are derived from the header's crop sampler, not stored; their tags are
//     not recomputed here (that needs the sampler) and are listed in `unchecked`.
// Usage: node zarrita_check.mjs STORE
// Prints one JSON object: {keys, arrays: {path: {dtype, shape, crc32c}}, manifest_ok, unchecked} where crc32c is the
// checksum of the array's bytes (C order, little-endian, bool as one byte) so a caller can compare them with
// its own reader. Exit codes: 0 ok, 1 a check failed (message on stderr), 2 usage, 3 float16 unsupported.
import * as fs from "node:fs";
import * as path from "node:path";
import * as zarr from "zarrita";
import FileSystemStore from "@zarrita/storage/fs";

// ------------------------------------------------------------------------------------ crc32c (Castagnoli)
const TABLE = new Uint32Array(256);
for (let n = 0; n < 256; n++) {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0x82f63b78 ^ (c >>> 1) : c >>> 1;
  TABLE[n] = c >>> 0;
}
function crc32c(bytes, crc = 0) {
  let c = ~crc >>> 0;
  for (let i = 0; i < bytes.length; i++) c = TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

class VerifyingCrc32c {
  kind = "bytes_to_bytes";
  static fromConfig() {
    return new VerifyingCrc32c();
  }
  encode(arr) {
    const out = new Uint8Array(arr.byteLength + 4);
    out.set(arr);
    new DataView(out.buffer).setUint32(arr.byteLength, crc32c(arr), true);
    return out;
  }
  decode(arr) {
    if (arr.byteLength < 4) throw new Error(`crc32c: chunk of ${arr.byteLength} bytes has no checksum`);
    const body = new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength - 4);
    const stored = new DataView(arr.buffer, arr.byteOffset + arr.byteLength - 4, 4).getUint32(0, true);
    const computed = crc32c(body);
    if (stored !== computed) {
      throw new Error(`crc32c mismatch: stored 0x${stored.toString(16)}, computed 0x${computed.toString(16)}`);
    }
    return body;
  }
  computeEncodedSize(n) {
    return n + 4;
  }
}
zarr.registry.set("crc32c", () => VerifyingCrc32c);

// ---------------------------------------------------------------------------------------------- float16
async function ensureFloat16() {
  if (typeof globalThis.Float16Array === "function") return "native";
  if (process.env.ZARRITA_CHECK_NO_POLYFILL) return null; // to test the refusal on a Node with the polyfill
  try {
    const { Float16Array } = await import("@petamoriken/float16");
    globalThis.Float16Array = Float16Array;
    return "polyfill";
  } catch {
    return null;
  }
}

// ------------------------------------------------------------------------------------------------- main
function fail(msg, code = 1) {
  process.stderr.write(msg + "\n");
  process.exit(code);
}

function bytesOf(data, dtype) {
  // The array's bytes, C order, little-endian (every platform Node runs on is little-endian); bool as 0/1.
  // A float16 array (native or polyfill) keeps its binary16 bits in its buffer: no conversion, no rounding.
  if (dtype === "bool") return Uint8Array.from(data, (v) => (v ? 1 : 0));
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

async function main() {
  const [root] = process.argv.slice(2);
  if (!root) fail("usage: node zarrita_check.mjs STORE", 2);
  const float16 = await ensureFloat16();
  const store = new FileSystemStore(path.resolve(root));
  const group = await zarr.open(zarr.root(store), { kind: "group" });
  const header = group.attrs.fkdstore;
  if (!header || header.format !== "fkdstore") fail(`${root}: no fkdstore header`);
  if (header.format_version.split(".")[0] !== "4") fail(`format ${header.format_version}: this script reads 4.x`);
  if (header.kind !== "regions") fail(`kind ${header.kind}: this script reads crop-region stores`);
  const regions = header.regions;
  const seeded = regions.crops.mode === "seeded";
  const softDir = path.join(root, "soft");
  const fields = fs.readdirSync(softDir).filter((f) => fs.existsSync(path.join(softDir, f, "zarr.json"))).sort();
  // manifest order (spec section 2): box, flip, aug columns in header order, codec fields in the codec's order.
  // The codec's field order is not in the header; `indices` precedes the value field in every codec.
  const soft = fields.sort((a, b) => (a === "indices" ? -1 : b === "indices" ? 1 : a.localeCompare(b)));
  const perCrop = ["box", "flip", ...regions.aug.map((a) => `aug/${a.name}`), ...soft.map((f) => `soft/${f}`)];
  const derived = seeded ? ["box", "flip"] : [];
  const bound = ["key", "image_size", "label"]; // per-image arrays the manifest binds, in this order
  const names = [...bound, "written", "manifest", ...perCrop.filter((n) => !derived.includes(n))];

  const out = { float16, keys: null, arrays: {}, manifest_ok: false, unchecked: derived };
  const values = {};
  for (const name of names) {
    // zarrita cannot even open a float16 array without Float16Array (it then reports "Not found: v2
    // array"): check the data type in the metadata first, to refuse with the real reason.
    const meta = JSON.parse(new TextDecoder().decode(await store.get(`/${name}/zarr.json`)));
    if (meta.data_type === "float16" && !float16) {
      fail(`${name}: float16 needs Float16Array (ES2025) or the @petamoriken/float16 polyfill`, 3);
    }
    const arr = await zarr.open(group.resolve(name), { kind: "array" });
    let chunk;
    try {
      chunk = await zarr.get(arr);
    } catch (e) {
      fail(`${name}: ${e.message}${e.cause ? ": " + e.cause.message : ""}`);
    }
    const bytes = bytesOf(chunk.data, arr.dtype);
    values[name] = { bytes, shape: chunk.shape, dtype: arr.dtype, fill: arr.fillValue, data: chunk.data };
    out.arrays[name] = { dtype: arr.dtype, shape: chunk.shape, crc32c: crc32c(bytes) };
  }

  // keys: spec section 2 recipe
  const k = values.key;
  const [n, L] = k.shape;
  const dec = new TextDecoder("utf-8", { fatal: true });
  out.keys = [];
  for (let i = 0; i < n; i++) {
    const row = k.bytes.subarray(i * L, (i + 1) * L);
    const end = row.indexOf(0);
    out.keys.push(dec.decode(end < 0 ? row : row.subarray(0, end)));
  }

  // manifest: invariant 9
  const ipc = header.layout.images_per_chunk;
  const ips = header.layout.images_per_shard;
  const cps = ips / ipc;
  const N = header.num_images;
  const shards = Math.ceil(N / ips);
  const man = values.manifest;
  const P = perCrop.length;
  const T = bound.length + cps * P;
  if (man.shape[0] !== shards || man.shape[1] !== T) {
    fail(`manifest has shape [${man.shape}], expected [${shards}, ${T}] (${bound}, then ${cps} x ${perCrop})`);
  }
  const tags = new Uint32Array(man.bytes.buffer.slice(man.bytes.byteOffset, man.bytes.byteOffset + man.bytes.byteLength));
  if (!/^[0-9a-f]{32}$/.test(header.store_id)) fail(`store_id must be 32 lowercase hex digits. Got ${header.store_id}`);
  const storeId = Uint8Array.from(header.store_id.match(/../g), (h) => parseInt(h, 16));
  const enc = new TextEncoder();
  function tagOf(name, c, rows, chunkRows) {
    // crc32c(store id || utf8(name) || 0x00 || uint64le(c) || chunk bytes), rows past N hold the fill value
    const v = values[name];
    const rowBytes = v.bytes.length / v.shape[0];
    const chunk = new Uint8Array(chunkRows * rowBytes);
    if (v.fill !== 0 && v.fill !== false) {
      const one = new v.data.constructor(1);
      one[0] = v.fill;
      const fillBytes = new Uint8Array(one.buffer);
      for (let i = 0; i < chunk.length; i++) chunk[i] = fillBytes[i % fillBytes.length];
    }
    chunk.set(v.bytes.subarray(rows * rowBytes, Math.min(v.bytes.length, (rows + chunkRows) * rowBytes)));
    const head = new Uint8Array([...storeId, ...enc.encode(name), 0,
      ...new Uint8Array(new BigUint64Array([BigInt(c)]).buffer)]);
    return crc32c(chunk, crc32c(head));
  }
  function check(name, s, col, tag) {
    const stored = tags[s * T + col];
    if (tag !== stored) {
      fail(`manifest mismatch: ${name}, shard ${s} column ${col}: computed 0x${tag.toString(16)}, stored 0x${stored.toString(16)}`);
    }
  }
  for (let s = 0; s < shards; s++) {
    bound.forEach((name, b) => check(name, s, b, tagOf(name, s, s * ips, ips)));
    for (let j = 0; j < cps; j++) {
      const c = s * cps + j;
      if (c * ipc >= N) continue; // chunks past N hold no tag
      perCrop.forEach((name, p) => {
        if (!derived.includes(name)) check(name, s, bound.length + j * P + p, tagOf(name, c, c * ipc, ipc));
      });
    }
  }
  out.manifest_ok = true;
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((e) => fail(`${e.stack || e}`));
