#!/usr/bin/env node
// A lockbroker client in Node.js, built from proto/lockbroker/v1/lock.proto alone: proof that the
// .proto is the whole contract. tests/test_node.py runs it against a real broker.
//
// Usage: [LOCKBROKER_API_KEY=KEY] node client.js TARGET [LOCK_NAME]
//
// With LOCKBROKER_API_KEY set (as for the Python CLI), every call carries it as `x-api-key` metadata,
// which is how a broker with a tenants file authenticates a caller.
//
// It creates two sessions, acquires LOCK_NAME with the first, checks that Describe shows that grant,
// checks that a try-lock from the second session fails ABORTED with ErrorInfo reason LOCK_HELD and a
// NotAcquired detail (both decoded from the grpc-status-details-bin trailer), checks the fencing
// token with CheckFence (CURRENT while held, STALE after the release), releases, closes both
// sessions and prints one JSON summary on stdout. On the way it takes a shared lock with both sessions
// and a semaphore permit (issue 17), checking Describe and the refusals, and sends one batch of
// requests on the Session stream (issue 14). Any failed check exits 1 with the reason on stderr.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const REPO = path.resolve(__dirname, "..", "..");
const PROTO_ROOT = path.join(REPO, "proto");
const LOCK_PROTO = "lockbroker/v1/lock.proto";
const DEADLINE_MS = 15000;

// google.rpc.Status and ErrorInfo as published in googleapis (google/rpc/status.proto,
// error_details.proto). No npm package of ours ships them, and these few field numbers are the
// whole wire contract, so they are declared here instead of adding a dependency.
const GOOGLE_RPC = `
syntax = "proto3";
package google.rpc;
message Status { int32 code = 1; string message = 2; repeated google.protobuf.Any details = 3; }
message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`;

function check(condition, what) {
  if (!condition) {
    throw new Error(`check failed: ${what}`);
  }
}

function loadService() {
  // keepCase: fields keep their .proto names (session_id), as the other examples in this repo write
  // them. longs: String, because fencing tokens are int64 and a JS number loses precision past 2^53.
  const definition = protoLoader.loadSync(LOCK_PROTO, {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).lockbroker.v1.LockService;
}

function loadDetailTypes() {
  // protobufjs ships the google/protobuf types itself: lock.proto's imports resolve to them,
  // google.protobuf.Any included (lock.proto imports it for the Session stream's Status), so
  // lock.proto is loaded first and the googleapis types parsed into the same root after it
  // (protobuf.parse, unlike load, does not follow imports).
  const root = new protobuf.Root();
  root.loadSync(path.join(PROTO_ROOT, LOCK_PROTO), { keepCase: true });
  protobuf.parse(GOOGLE_RPC, root, { keepCase: true });
  root.resolveAll();
  return {
    Status: root.lookupType("google.rpc.Status"),
    ErrorInfo: root.lookupType("google.rpc.ErrorInfo"),
    NotAcquired: root.lookupType("lockbroker.v1.NotAcquired"),
  };
}

const TYPES = loadDetailTypes();
const TO_OBJECT = { longs: String, defaults: true };

// The rich error model: google.rpc.Status, serialized, in the grpc-status-details-bin trailer.
function decodeStatusDetails(err) {
  const raw = err.metadata ? err.metadata.get("grpc-status-details-bin") : [];
  check(raw.length === 1, `one grpc-status-details-bin trailer on ${err.code}: ${err.details}`);
  const status = TYPES.Status.toObject(TYPES.Status.decode(raw[0]), TO_OBJECT);
  const out = { code: status.code, message: status.message, error_info: null, not_acquired: null, others: [] };
  for (const any of status.details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    if (typeName === "google.rpc.ErrorInfo") {
      out.error_info = TYPES.ErrorInfo.toObject(TYPES.ErrorInfo.decode(any.value), TO_OBJECT);
    } else if (typeName === "lockbroker.v1.NotAcquired") {
      out.not_acquired = TYPES.NotAcquired.toObject(TYPES.NotAcquired.decode(any.value), TO_OBJECT);
    } else {
      out.others.push(typeName);
    }
  }
  return out;
}

// Per-call metadata rather than call credentials: grpc-js refuses call credentials on an insecure
// channel, and a broker on loopback may well run plaintext with API keys.
function callMetadata() {
  const metadata = new grpc.Metadata();
  const key = process.env.LOCKBROKER_API_KEY;
  if (key) {
    metadata.set("x-api-key", key);
  }
  return metadata;
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + DEADLINE_MS);
    client[method](request, callMetadata(), { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function expectError(promise, what) {
  try {
    const response = await promise;
    throw new Error(`check failed: ${what} succeeded: ${JSON.stringify(response)}`);
  } catch (err) {
    if (err.code === undefined) {
      throw err;
    }
    return err;
  }
}

const seconds = (s) => ({ seconds: String(s), nanos: 0 });

// The Session stream with batches (lock.proto, `rpc Session`, "Batches"): ask with the metadata,
// read the grant from the initial metadata, send `requests` as one batch message and collect one
// answer per request id, whether they come alone or in batches. Half-closes once all are in.
function sessionBatch(client, requests) {
  return new Promise((resolve, reject) => {
    const metadata = callMetadata();
    metadata.set("lockbroker-batch", "1");
    const call = client.Session(metadata, { deadline: new Date(Date.now() + DEADLINE_MS) });
    const answers = {};
    let granted = null;
    let messages = 0;
    call.on("metadata", (m) => {
      granted = m.get("lockbroker-batch")[0] || null;
    });
    call.on("data", (resp) => {
      messages += 1;
      for (const one of resp.kind === "batch" ? resp.batch.responses : [resp]) {
        check(answers[one.id] === undefined, `one answer per request id (${one.id})`);
        answers[one.id] = one;
      }
      if (Object.keys(answers).length === requests.length) {
        call.end();
      }
    });
    call.on("error", reject);
    call.on("end", () => resolve({ granted, answers, messages }));
    call.write({ batch: { requests } });
  });
}

async function run(target, name) {
  const LockService = loadService();
  // The published service config: retries UNAVAILABLE, as docs/other-languages.md recommends.
  const serviceConfig = fs.readFileSync(path.join(REPO, "docs", "service-config.json"), "utf8");
  const client = new LockService(target, grpc.credentials.createInsecure(), {
    "grpc.service_config": JSON.stringify(JSON.parse(serviceConfig)),
  });
  const sessions = [];
  try {
    const a = await unary(client, "CreateSession", { ttl: seconds(10), owner: "node-a" });
    sessions.push(a.session_id);
    const b = await unary(client, "CreateSession", { ttl: seconds(10), owner: "node-b" });
    sessions.push(b.session_id);
    check(/^[0-9a-f]{16}$/.test(a.session_id), `session id is 16 hex digits: ${a.session_id}`);
    check(a.ttl.seconds === "10", `ttl echoed: ${JSON.stringify(a.ttl)}`);

    const acquired = await unary(client, "Acquire", {
      name,
      session_id: a.session_id,
      owner: "node-a",
      request_id: `node-${process.pid}-${Date.now()}`,
    });
    const grant = acquired.grant;
    const token = grant.fencing_token;
    check(typeof token === "string" && /^[1-9][0-9]*$/.test(token), `int64 fencing token as a string: ${token}`);
    check(grant.name === name && grant.session_id === a.session_id, `grant names the lock and session`);

    const described = await unary(client, "Describe", { name });
    check(described.holder !== null, "Describe shows a holder");
    check(described.holder.fencing_token === token, `holder token ${described.holder.fencing_token} == ${token}`);
    check(described.holder.session_id === a.session_id, "holder is session a");
    check(described.waiters.length === 0, "nobody waits");

    const err = await expectError(
      unary(client, "Acquire", { name, session_id: b.session_id, owner: "node-b", wait_timeout: seconds(0) }),
      "a try-lock on a held lock",
    );
    check(err.code === grpc.status.ABORTED, `try-lock fails ABORTED, got ${err.code}: ${err.details}`);
    const details = decodeStatusDetails(err);
    check(details.code === grpc.status.ABORTED, `Status.code ${details.code} matches the call's code`);
    check(details.error_info !== null, "an ErrorInfo detail");
    check(details.error_info.reason === "LOCK_HELD", `reason ${details.error_info.reason}`);
    check(details.error_info.domain === "lockbroker", `domain ${details.error_info.domain}`);
    check(details.not_acquired !== null, "a NotAcquired detail");
    check(details.not_acquired.holder.fencing_token === token, "NotAcquired names the holder's token");

    const fence = await unary(client, "CheckFence", { name, fencing_token: token });
    check(fence.status === "FENCE_STATUS_CURRENT", `CheckFence while held: ${fence.status}`);
    check(fence.current_fencing_token === token, `CheckFence names the holder's token`);

    const released = await unary(client, "Release", { name, fencing_token: token, session_id: a.session_id });
    check(released.released === true, "Release deletes the grant");
    const fenceAfter = await unary(client, "CheckFence", { name, fencing_token: token });
    check(fenceAfter.status === "FENCE_STATUS_STALE", `CheckFence after release: ${fenceAfter.status}`);
    const again = await unary(client, "Release", { name, fencing_token: token });
    check(again.released === false, "a second Release finds nothing");
    const free = await unary(client, "Describe", { name });
    check(free.holder === null, "Describe shows the lock free after Release");

    // A shared (read) lock: both sessions hold it at once; Describe lists both holders and modes.
    const sharedName = `${name}/shared`;
    const readers = [];
    for (const session_id of [a.session_id, b.session_id]) {
      const r = await unary(client, "Acquire", { name: sharedName, session_id, mode: "LOCK_MODE_SHARED" });
      check(r.grant.mode === "LOCK_MODE_SHARED", `a shared grant: ${r.grant.mode}`);
      readers.push(r.grant.fencing_token);
    }
    const sharedState = await unary(client, "Describe", { name: sharedName });
    for (const token of readers) {
      await unary(client, "Release", { name: sharedName, fencing_token: token });
    }

    // A semaphore of 1 permit: the second session's try is refused, and another limit is refused.
    const semName = `${name}/sem`;
    const permit = await unary(client, "Acquire", { name: semName, session_id: a.session_id, limit: 1 });
    const busy = await expectError(
      unary(client, "Acquire", { name: semName, session_id: b.session_id, limit: 1 }),
      "a second permit of a semaphore of 1",
    );
    const busyDetails = decodeStatusDetails(busy);
    const other = await expectError(
      unary(client, "Acquire", { name: semName, session_id: b.session_id, limit: 2, wait_timeout: seconds(1) }),
      "a permit with another limit",
    );
    const otherDetails = decodeStatusDetails(other);
    const semState = await unary(client, "Describe", { name: semName });
    await unary(client, "Release", { name: semName, fencing_token: permit.grant.fencing_token });

    // Three requests in one Session stream message: two acquires and a keepalive.
    const streamNames = [`${name}/stream-1`, `${name}/stream-2`];
    const streamed = await sessionBatch(client, [
      { id: "1", acquire: { name: streamNames[0], session_id: a.session_id, request_id: "node-stream-1" } },
      { id: "2", keepalive: { session_id: a.session_id } },
      { id: "3", acquire: { name: streamNames[1], session_id: a.session_id, request_id: "node-stream-2" } },
    ]);
    const streamTokens = ["1", "3"].map((id) => {
      const answer = streamed.answers[id];
      check(answer && answer.kind === "acquire", `stream answer ${id} is a grant: ${JSON.stringify(answer)}`);
      return answer.acquire.grant.fencing_token;
    });
    check(streamed.answers["2"].kind === "keepalive", "stream answer 2 is the keepalive's");
    for (const [i, token] of streamTokens.entries()) {
      await unary(client, "Release", { name: streamNames[i], fencing_token: token });
    }

    const closed = [];
    while (sessions.length > 0) {
      closed.push((await unary(client, "CloseSession", { session_id: sessions.shift() })).closed);
    }
    return {
      target,
      name,
      sessions: [a.session_id, b.session_id],
      fencing_token: token,
      describe_holder: { session_id: described.holder.session_id, fencing_token: described.holder.fencing_token },
      refused: {
        code: grpc.status[err.code],
        reason: details.error_info.reason,
        domain: details.error_info.domain,
        metadata: details.error_info.metadata,
        not_acquired_holder_token: details.not_acquired.holder.fencing_token,
        other_details: details.others,
      },
      fence: { status: fence.status, current_fencing_token: fence.current_fencing_token },
      fence_after: { status: fenceAfter.status, current_fencing_token: fenceAfter.current_fencing_token },
      released: released.released,
      released_again: again.released,
      shared: {
        tokens: readers,
        holders: sharedState.holders.map((h) => [h.fencing_token, h.mode]),
      },
      semaphore: {
        limit: permit.grant.limit,
        busy: [grpc.status[busy.code], busyDetails.error_info.reason],
        other: [grpc.status[other.code], otherDetails.error_info.reason, otherDetails.error_info.metadata],
        described_limit: semState.limit,
        holders: semState.holders.length,
      },
      stream: {
        granted: streamed.granted,
        tokens: streamTokens,
        keepalive_ttl: streamed.answers["2"].keepalive.ttl.seconds,
        messages: streamed.messages,
      },
      closed,
    };
  } finally {
    // Whatever failed, leave no session behind (each close is best effort).
    for (const session_id of sessions) {
      await unary(client, "CloseSession", { session_id }).catch(() => {});
    }
    client.close();
  }
}

async function main() {
  const [target, name = `node/${process.pid}`] = process.argv.slice(2);
  if (!target) {
    process.stderr.write("usage: node client.js TARGET [LOCK_NAME]\n");
    return 2;
  }
  try {
    process.stdout.write(`${JSON.stringify(await run(target, name))}\n`);
    return 0;
  } catch (err) {
    process.stderr.write(`${err.stack || err}\n`);
    return 1;
  }
}

main().then((code) => {
  process.exitCode = code;
});
