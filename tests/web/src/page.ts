// The browser side of sluice's gRPC-Web integration test. Bundled by build.sh into
// dist/grpc-web-test.js and loaded by dist/index.html?target=<proxy base URL>&suite=full|blocked.
//
// Runs the cases one after another, each with a 5 s deadline, and writes
//   {"cases": {"NAME": {"ok": bool, "code": number|null, "message": string, "detail": any}}}
// into <pre id="results"> (which holds "running" until then), then sets document.title = "done".
//
// Binary cases (application/grpc-web+proto) use connect-web's createGrpcWebTransport; text cases
// (application/grpc-web-text) use Google's grpc-web runtime with hand-written method descriptors.

import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { ConnectError, createClient } from "@connectrpc/connect";
import type { Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { GrpcWebClientBase, MethodDescriptor } from "grpc-web";
import type { Metadata } from "grpc-web";
import { Echo, EchoRequestSchema, EchoResponseSchema } from "./gen/echo_pb";
import type { EchoRequest, EchoResponse } from "./gen/echo_pb";

const DEADLINE_MS = 5000;
// Last resort if a library never settles a call: well after the 5 s deadline.
const WATCHDOG_MS = 12000;
// The grpc interop "special status message".
const SPECIAL =
  "\t\ntest with whitespace\r\nand Unicode BMP \u263A and non-BMP \u{1F608}\t\n";

type Req = MessageInitShape<typeof EchoRequestSchema>;
type Outcome = { ok: boolean; code: number | null; message: string; detail: unknown };
type Case = {
  name: string;
  // Resolves with the case's detail when the call succeeds; throws the library's error otherwise.
  run: () => Promise<unknown>;
  // Detail to record when the call fails (default: the error's class).
  onError?: (code: number | null, message: string) => unknown;
};

const params = new URLSearchParams(location.search);
const target = (params.get("target") ?? "").replace(/\/+$/, "");
const suite = params.get("suite") ?? "full";
// How connect-web does its HTTP: "xhr" or "fetch" (the browser's own). See xhrFetch. The blocked
// suite defaults to fetch (its call fails before any body is read, and the error is the browser's).
const io = params.get("io") ?? (suite === "blocked" ? "fetch" : "xhr");

// Both modes offer the same two calls, so every case is written once and run in each mode.
type CallOpts = { base?: string; path?: string; headers?: Record<string, string> };
type Mode = {
  unary(req: Req, opts?: CallOpts): Promise<{ reply: EchoResponse; header: (key: string) => string | null }>;
  serverStream(req: Req): Promise<{ count: number; last: string | null }>;
};

// ---- binary: connect-web, application/grpc-web+proto ------------------------------------------

// A fetch() for connect-web made of XMLHttpRequest, which resolves once the whole response is in.
// Why: under `chromium --headless --virtual-time-budget=N --dump-dom`, virtual time only stands
// still while a network fetch is pending, and Chromium stops counting a fetch() as pending once
// its response headers arrive. While connect-web then reads the body, virtual time jumps to the
// next timer: the call's own 5 s deadline fires (spurious DEADLINE_EXCEEDED) or the budget runs
// out and the DOM is dumped while the page still says "running". An XHR stays pending until its
// body is complete, so with it nothing waits on virtual time. The gRPC-Web protocol code (headers,
// framing, trailers, status) is still connect-web's own; use ?io=fetch to get the real fetch.
function xhrFetch(input: RequestInfo | URL, init: RequestInit = {}): Promise<Response> {
  return new Promise((resolve, reject) => {
    const signal = init.signal;
    if (signal?.aborted) return reject(signal.reason);
    const xhr = new XMLHttpRequest();
    xhr.open(init.method ?? "GET", String(input));
    xhr.responseType = "arraybuffer";
    new Headers(init.headers).forEach((value, key) => xhr.setRequestHeader(key, value));
    const onAbort = () => xhr.abort();
    signal?.addEventListener("abort", onAbort);
    const settle = () => signal?.removeEventListener("abort", onAbort);
    xhr.onload = () => {
      settle();
      // Under CORS this holds only the safelisted and exposed headers, like fetch's.
      const headers = new Headers();
      for (const line of xhr.getAllResponseHeaders().split("\r\n")) {
        const i = line.indexOf(":");
        if (i > 0) headers.append(line.slice(0, i).trim(), line.slice(i + 1).trim());
      }
      const nullBody = [101, 103, 204, 205, 304].includes(xhr.status);
      resolve(new Response(nullBody ? null : xhr.response, { status: xhr.status, statusText: xhr.statusText, headers }));
    };
    // The message fetch() gives for the same network or CORS failures.
    xhr.onerror = () => (settle(), reject(new TypeError("Failed to fetch")));
    xhr.onabort = () => (settle(), reject(signal?.reason ?? new DOMException("aborted", "AbortError")));
    xhr.send((init.body ?? null) as XMLHttpRequestBodyInit | null);
  });
}

function binaryClient(baseUrl: string, path?: string) {
  // A hand-made path (unknown method or service): rewrite the URL of an Echo/Unary call.
  const interceptors: Interceptor[] = path ? [(next) => (req) => next({ ...req, url: baseUrl + path })] : [];
  const fetch = io === "fetch" ? undefined : xhrFetch;
  return createClient(Echo, createGrpcWebTransport({ baseUrl, useBinaryFormat: true, interceptors, fetch }));
}

const binary: Mode = {
  async unary(req, opts = {}) {
    let header = new Headers();
    const reply = await binaryClient(opts.base ?? target, opts.path).unary(req, {
      timeoutMs: DEADLINE_MS,
      headers: opts.headers,
      onHeader: (h) => (header = h),
    });
    return { reply, header: (k) => header.get(k) };
  },
  async serverStream(req) {
    let count = 0;
    let last: string | null = null;
    for await (const r of binaryClient(target).serverStream(req, { timeoutMs: DEADLINE_MS })) {
      count++;
      last = r.message;
    }
    return { count, last };
  },
};

// ---- text: grpc-web (Google), application/grpc-web-text ---------------------------------------

const textClient = new GrpcWebClientBase({ format: "text" });

// The runtime only calls the serialize/deserialize functions; the two constructors are unused.
function descriptor(path: string, kind: "unary" | "server_streaming") {
  const unused = Object as unknown as new () => never;
  return new MethodDescriptor<EchoRequest, EchoResponse>(
    path,
    kind,
    unused,
    unused,
    (m: EchoRequest) => toBinary(EchoRequestSchema, m),
    (b: Uint8Array) => fromBinary(EchoResponseSchema, b),
  );
}

function textMetadata(extra: Metadata = {}): Metadata {
  // The runtime turns "deadline" (epoch ms) into grpc-timeout: <ms>m.
  return { ...extra, deadline: String(Date.now() + DEADLINE_MS) };
}

const text: Mode = {
  unary(req, opts = {}) {
    const path = opts.path ?? "/echo.v1.Echo/Unary";
    return new Promise((resolve, reject) => {
      let header: Metadata = {};
      const call = textClient.rpcCall(
        (opts.base ?? target) + path,
        create(EchoRequestSchema, req),
        textMetadata(opts.headers),
        descriptor(path, "unary"),
        (err, reply) => (err ? reject(err) : resolve({ reply, header: (k) => header[k] ?? null })),
      );
      // Emitted when the response completes, before the callback of a successful call.
      call.on("metadata", (m) => (header = m));
    });
  },
  serverStream(req) {
    const path = "/echo.v1.Echo/ServerStream";
    return new Promise((resolve, reject) => {
      let count = 0;
      let last: string | null = null;
      const stream = textClient.serverStreaming(
        target + path,
        create(EchoRequestSchema, req),
        textMetadata(),
        descriptor(path, "server_streaming"),
      );
      stream.on("data", (r) => {
        count++;
        last = r.message;
      });
      // After an error status the runtime may also emit "end"; the first one settles the promise.
      stream.on("error", (e) => reject(e));
      stream.on("end", () => resolve({ count, last }));
    });
  },
};

// ---- cases ------------------------------------------------------------------------------------

function payload(): Uint8Array {
  const p = new Uint8Array(262144);
  for (let i = 0; i < p.length; i++) p[i] = i % 251;
  return p;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

// For cases that expect an error: what to report if the call succeeds after all.
async function unexpected(call: ReturnType<Mode["unary"]>) {
  const { reply } = await call;
  return { unexpected_reply: reply.message };
}

const fullCases: Array<[string, (m: Mode, mode: "binary" | "text") => Case["run"], Case["onError"]?]> = [
  ["unary", (m, mode) => async () => {
    const { reply } = await m.unary({ message: mode === "binary" ? "hello" : "hello text" });
    return { message: reply.message, backend_id: reply.backendId };
  }],
  ["server_stream", (m) => () => m.serverStream({ message: "s", repeat: 100 })],
  ["backend_error", (m) => () => unexpected(m.unary({ failCode: 5, failMessage: "no such thing" }))],
  ["no_route", (m) => () => unexpected(m.unary({ message: "x" }, { base: target + "/nowhere" }))],
  ["metadata", (m) => async () => {
    const { header } = await m.unary({ message: "md" }, { headers: { "x-custom": "from-browser" } });
    return { echoed: header("x-custom"), backend: header("x-backend-id") };
  }],
  ["empty_unary", (m) => async () => {
    const { reply } = await m.unary({});
    return { message: reply.message };
  }],
  ["large_unary", (m) => async () => {
    const p = payload();
    const { reply } = await m.unary({ payload: p });
    return { length: reply.payload.length, same: sameBytes(reply.payload, p) };
  }],
  [
    "special_message",
    (m) => () => unexpected(m.unary({ failCode: 2, failMessage: SPECIAL })),
    (_code, message) => ({ equal: message === SPECIAL }),
  ],
  ["unimplemented_method", (m) => () => unexpected(m.unary({ message: "x" }, { path: "/echo.v1.Echo/NoSuchMethod" }))],
  ["unimplemented_service", (m) => () => unexpected(m.unary({ message: "x" }, { path: "/echo.v1.NoSuchService/Unary" }))],
];

function fullSuite(): Case[] {
  return fullCases.flatMap(([name, make, onError]) =>
    (["binary", "text"] as const).map((mode) => ({
      name: `${name}_${mode}`,
      run: make(mode === "binary" ? binary : text, mode),
      onError,
    })),
  );
}

function blockedSuite(): Case[] {
  return [{ name: "blocked", run: () => unexpected(binary.unary({ message: "blocked?" })) }];
}

// ---- runner -----------------------------------------------------------------------------------

function describeError(e: unknown): { code: number | null; message: string; kind: string } {
  if (e instanceof ConnectError) {
    return { code: e.code, message: e.rawMessage, kind: "ConnectError" };
  }
  // grpc-web: RpcError, or a plain {code, message} from the status callback.
  if (typeof e === "object" && e !== null && typeof (e as { code?: unknown }).code === "number") {
    const r = e as { code: number; message?: unknown };
    return { code: r.code, message: String(r.message ?? ""), kind: e instanceof Error ? e.name : "status" };
  }
  // Anything else is a bug in this page or a library, not a gRPC status.
  return { code: null, message: String(e), kind: e instanceof Error ? `script:${e.name}` : "script" };
}

async function runOne(c: Case): Promise<Outcome> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const watchdog = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`watchdog: no outcome after ${WATCHDOG_MS} ms`)), WATCHDOG_MS);
  });
  try {
    const detail = await Promise.race([c.run(), watchdog]);
    return { ok: true, code: 0, message: "", detail: detail ?? null };
  } catch (e) {
    const { code, message, kind } = describeError(e);
    const detail = c.onError ? c.onError(code, message) : { error: kind };
    return { ok: false, code, message, detail };
  } finally {
    clearTimeout(timer);
  }
}

async function main() {
  const pre = document.getElementById("results")!;
  pre.textContent = "running";
  const results: Record<string, Outcome> = {};
  if (!target) {
    results["setup"] = { ok: false, code: null, message: "missing ?target= query parameter", detail: null };
  } else {
    const cases = suite === "blocked" ? blockedSuite() : suite === "full" ? fullSuite() : [];
    if (cases.length === 0) {
      results["setup"] = { ok: false, code: null, message: `unknown suite ${JSON.stringify(suite)}`, detail: null };
    }
    for (const c of cases) {
      results[c.name] = await runOne(c);
    }
  }
  pre.textContent = JSON.stringify({ cases: results });
  document.title = "done";
}

main().catch((e) => {
  document.getElementById("results")!.textContent = JSON.stringify({
    cases: { setup: { ok: false, code: null, message: `page error: ${String(e)}`, detail: null } },
  });
  document.title = "done";
});
