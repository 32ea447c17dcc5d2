// Seeds the in-cluster Azurite lake for one e2e scenario. Run by a Job on the Azurite
// image (it has Node.js, already pinned and pulled for the lake; no storage SDK, so the
// requests are signed here with Shared Key, as the Azure REST reference describes it).
//
// Input (environment):
//   LAKE_ENDPOINT   http://<account>.<namespace>.svc.cluster.local:10000 (virtual-host style)
//   LAKE_ACCOUNT    the account name (the first label of the endpoint's host)
//   LAKE_KEY        the account key, base64
//   LAKE_CONTAINER  container, created if missing
//   LAKE_PREFIX     blob name prefix, ending in "/"
//   SEED_FILES      JSON: [{"name": "dir/file.bin", "size": 1234}, ...]
//
// Output (stdout): one `<sha256>  <name>` line per file (sha256sum's format) for the bytes
// it uploaded, then `SEEDED <files> <bytes>`. The bytes are random: the test trusts only
// these checksums, computed here from the very buffer that was sent, and compares them with
// what readers compute through Tidepool's mounts. Any failure exits non-zero.
"use strict";

const crypto = require("crypto");
const http = require("http");

const endpoint = new URL(process.env.LAKE_ENDPOINT);
const account = process.env.LAKE_ACCOUNT;
const key = Buffer.from(process.env.LAKE_KEY, "base64");
const container = process.env.LAKE_CONTAINER;
const prefix = process.env.LAKE_PREFIX;
const files = JSON.parse(process.env.SEED_FILES);
const API_VERSION = "2021-12-02";

// One signed request. Every header the signature covers is set here explicitly (Node's
// http adds only Host and Connection, which Shared Key does not sign).
function send(method, path, query, extraHeaders, body) {
  const length = body ? body.length : 0;
  const headers = Object.assign(
    {
      "x-ms-date": new Date().toUTCString(),
      "x-ms-version": API_VERSION,
      "content-length": String(length),
    },
    extraHeaders
  );
  const canonicalHeaders = Object.keys(headers)
    .filter((h) => h.startsWith("x-ms-"))
    .sort()
    .map((h) => `${h}:${headers[h]}\n`)
    .join("");
  const queryKeys = Object.keys(query).sort();
  const canonicalResource =
    `/${account}${path}` + queryKeys.map((k) => `\n${k}:${query[k]}`).join("");
  const stringToSign =
    [
      method,
      "", // Content-Encoding
      "", // Content-Language
      length > 0 ? String(length) : "", // Content-Length (empty when 0)
      "", // Content-MD5
      headers["content-type"] || "",
      "", // Date (x-ms-date is used)
      "", // If-Modified-Since
      "", // If-Match
      "", // If-None-Match
      "", // If-Unmodified-Since
      "", // Range
    ].join("\n") +
    "\n" +
    canonicalHeaders +
    canonicalResource;
  const signature = crypto.createHmac("sha256", key).update(stringToSign, "utf8").digest("base64");
  headers["authorization"] = `SharedKey ${account}:${signature}`;
  const search = queryKeys.map((k) => `${k}=${encodeURIComponent(query[k])}`).join("&");
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: endpoint.hostname,
        port: endpoint.port || 80,
        method,
        path: path + (search ? `?${search}` : ""),
        headers,
      },
      (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () =>
          resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString("utf8") })
        );
      }
    );
    req.on("error", reject);
    if (body) req.write(body);
    req.end();
  });
}

// Azurite may still be starting, and cluster DNS may lag a new Service: retry connection
// errors (not HTTP errors) for up to two minutes.
async function sendRetrying(...args) {
  const deadline = Date.now() + 120000;
  for (;;) {
    try {
      return await send(...args);
    } catch (e) {
      if (Date.now() > deadline) throw e;
      console.error(`lake not reachable yet (${e.code || e.message}); retrying`);
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
}

async function main() {
  const made = await sendRetrying("PUT", `/${container}`, { restype: "container" }, {}, null);
  if (made.status !== 201 && made.status !== 409) {
    throw new Error(`creating container ${container}: HTTP ${made.status} ${made.body}`);
  }
  let bytes = 0;
  for (const f of files) {
    if (!/^[a-z0-9._\/-]+$/.test(f.name)) {
      throw new Error(`file name ${f.name} needs URL encoding; use [a-z0-9._/-] only`);
    }
    const data = crypto.randomBytes(f.size);
    const put = await sendRetrying(
      "PUT",
      `/${container}/${prefix}${f.name}`,
      {},
      { "x-ms-blob-type": "BlockBlob", "content-type": "application/octet-stream" },
      data
    );
    if (put.status !== 201) {
      throw new Error(`uploading ${prefix}${f.name}: HTTP ${put.status} ${put.body}`);
    }
    console.log(`${crypto.createHash("sha256").update(data).digest("hex")}  ${f.name}`);
    bytes += f.size;
  }
  console.log(`SEEDED ${files.length} ${bytes}`);
}

main().catch((e) => {
  console.error(`seeding failed: ${e.stack || e}`);
  process.exit(1);
});
