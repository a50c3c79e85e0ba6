"""The JavaScript side of a JS action's context: ``api``, ``console``, the event, errors.

Evaluated once per context, in the same script as the action (so stack
frames can be told apart by line: the action's lines follow the prelude's).
It runs before any action code and captures every intrinsic it uses, so an
action that later rewrites ``Object.prototype``, ``Array.prototype``,
``JSON`` or ``Promise`` changes nothing the api relies on. Objects it builds
get their keys by ``defineProperty`` (never by assignment, which a setter
planted on a prototype could intercept) and are frozen.

The only way out of the context is ``host(op, text)``: ``op`` is a method name
of the protocol's table (or ``console``), ``text`` the arguments as JSON text
produced by ``enc`` below, which throws ``TypeError`` for anything that is
not plain JSON (functions, Date objects, BigInt, circular references, class
instances, non-finite numbers). The worker checks the arguments again against
the same table as for Python actions, and the supervisor checks them a third
time. Nothing of the host is reachable from the action: ``host`` is deleted
from the global object before the action's code runs and lives only in this
closure.

The script evaluates to ``entry(op, a, b, c)``: ``"run"`` starts one
execution, ``"deliver"`` settles a pending ``api.fetch``.
"""

from __future__ import annotations

# The factory of the action follows this text directly: "(function (...) {\n" + source + "\n})".
PRELUDE = r"""(function (host, table, config) {
"use strict";
const O = Object, freeze = O.freeze, create = O.create, keys = O.keys, getProto = O.getPrototypeOf;
const defineProp = O.defineProperty, isArray = Array.isArray, apply = Reflect.apply;
const OP = O.prototype, S = String, stringify = JSON.stringify, parse = JSON.parse;
const E = Error, TE = TypeError, RE = RangeError, IEP = InternalError.prototype;
const P = Promise, then = P.prototype.then, resolveP = P.resolve, isInteger = Number.isInteger;
const slice = S.prototype.slice, indexOf = S.prototype.indexOf, charCodeAt = S.prototype.charCodeAt;
const MAX_DEPTH = 32, MAX_TEXT = config.max_text;
const fileName = config.filename, srcFirst = config.first_line, srcLast = config.last_line;
let oom = false;      // set when the engine ran out of memory, even if the action caught it
let cur = null;       // the running execution: {active, api, pending}
let factory = null;

// Descriptors without a prototype: a "get"/"set"/"value" planted on Object.prototype must not leak into them.
function def(obj, key, value) {
  const d = create(null);
  d.value = value;
  d.enumerable = true;
  defineProp(obj, key, d);
}

// -- stack traces: only the action's own frames, with its file name and line numbers --------
function frames(callsites) {
  let out = "";
  for (let i = 0; i < callsites.length; i++) {
    const c = callsites[i];
    const line = c.getLineNumber();
    if (typeof line !== "number" || line < srcFirst || line > srcLast) continue;
    const where = fileName + ":" + (line - srcFirst + 1) + ":" + c.getColumnNumber();
    const fn = c.getFunctionName();
    out += (fn ? "\n    at " + fn + " (" + where + ")" : "\n    at " + where);
  }
  return out;
}
function prepareStackTrace(err, callsites) {
  let head = "Error";
  try {
    if (getProto(err) === IEP && err.message === "out of memory") oom = true;
    head = S(err.name) + ": " + S(err.message);
  } catch (x) {}
  try { return head + frames(callsites); } catch (x) { return head; }
}
// The engine keeps both settings behind accessors on Error: set them through the engine's setter, then
// replace the accessors with ones that ignore the action's writes (the engine reads its own copy).
function lock(key, value) {
  const d = O.getOwnPropertyDescriptor(E, key);
  if (d && typeof d.set === "function") apply(d.set, E, [value]);
  defineProp(E, key, {get: function () { return value; }, set: function () {}, configurable: false});
}
lock("prepareStackTrace", prepareStackTrace);
lock("stackTraceLimit", 64);

class ApiError extends E {}
defineProp(ApiError.prototype, "name", {value: "ApiError"});
class ApiNotAvailable extends E {}
defineProp(ApiNotAvailable.prototype, "name", {value: "ApiNotAvailable"});
class HandlerNotFound extends E {}
defineProp(HandlerNotFound.prototype, "name", {value: "HandlerNotFound"});
const ERRORS = create(null);
ERRORS.TypeError = TE; ERRORS.ValueError = RE; ERRORS.RangeError = RE;
ERRORS.ApiNotAvailable = ApiNotAvailable; ERRORS.ApiClosed = E; ERRORS.Error = E;

// -- values: JSON only, checked at call time -------------------------------------------------
function describe(v) {
  try {
    const proto = getProto(v);
    const ctor = proto && proto.constructor;
    const name = typeof ctor === "function" && typeof ctor.name === "string" ? ctor.name : "";
    return name === "Date" ? "a Date object (store dates as strings: new Date().toISOString())"
      : name ? "an object of class " + name : "an exotic object";
  } catch (x) { return "an exotic object"; }
}
function enc(v, where, depth, path) {
  switch (typeof v) {
    case "string": return stringify(v);
    case "boolean": return v ? "true" : "false";
    case "undefined": return "null";
    case "number": {
      if (v !== v || v === 1 / 0 || v === -1 / 0) throw new TE(where + ": " + v + " is not a JSON number");
      const t = "" + v;
      // beyond 2**63 integers travel as floats (like JSON.parse would read them back)
      return isInteger(v) && (v >= 9223372036854775807 || v <= -9223372036854775807) && apply(indexOf, t, ["e"]) < 0 ? t + ".0" : t;
    }
    case "bigint": throw new TE(where + ": a BigInt is not JSON-serialisable");
    case "function": throw new TE(where + ": a function is not JSON-serialisable");
    case "symbol": throw new TE(where + ": a Symbol is not JSON-serialisable");
  }
  if (v === null) return "null";
  if (depth >= MAX_DEPTH) throw new TE(where + ": nested deeper than " + MAX_DEPTH + " levels");
  for (let p = path; p !== null; p = p.up) if (p.v === v) throw new TE(where + ": circular reference");
  const inner = create(null);  // the containers on the way here, as a linked list
  inner.v = v;
  inner.up = path;
  let out;
  if (isArray(v)) {
    out = "[";
    const n = v.length;
    if (n > MAX_TEXT) throw new RE(where + ": array too large");
    for (let i = 0; i < n; i++) {
      out += (i ? "," : "") + enc(v[i], where + "[" + i + "]", depth + 1, inner);
      if (out.length > MAX_TEXT) throw new RE(where + ": value too large");
    }
    return out + "]";
  }
  const proto = getProto(v);
  if (proto !== OP && proto !== null) throw new TE(where + ": " + describe(v) + " is not JSON-serialisable");
  out = "{";
  const ks = keys(v);
  let first = true;
  for (let i = 0; i < ks.length; i++) {
    const k = ks[i], x = v[k];
    if (x === undefined) continue;  // as JSON.stringify: undefined properties are left out
    out += (first ? "" : ",") + stringify(k) + ":" + enc(x, where + "." + k, depth + 1, inner);
    first = false;
    if (out.length > MAX_TEXT) throw new RE(where + ": value too large");
  }
  return out + "}";
}
function encArgs(name, args, n) {
  while (n > 0 && args[n - 1] === undefined) n--;  // omitted optional arguments
  let out = "[";
  for (let i = 0; i < n; i++) out += (i ? "," : "") + enc(args[i], "api." + name + ": argument " + (i + 1), 0, null);
  if (out.length > MAX_TEXT) throw new RE("api." + name + ": the arguments are too large for one call (" + MAX_TEXT + " bytes at most)");
  return out + "]";
}

// -- calls into the worker -----------------------------------------------------------------
function fail(info) {
  const C = ERRORS[info[0]];
  const e = C ? new C(info[1]) : new ApiError(info[1]);
  if (info[2]) { def(e, "kind", info[2]); def(e, "error_kind", info[2]); }
  return e;
}
// Every string handed to the host goes through String(): the engine builds long concatenations as ropes,
// which the binding cannot convert; String() returns them flattened.
function call(name, text) {
  if (oom) throw new RE("api." + name + ": this execution already ran out of memory");
  const r = host(name, S(text));
  const tag = r[0];
  if (tag === "0") return undefined;
  const value = parse(apply(slice, r, [1]));
  if (tag === "1") return value;
  throw fail(value);
}
function check(ex) {
  if (!ex.active) throw new E("this api object belongs to a finished execution");
}

function method(ex, m) {
  const name = m[0], returns = m[1], nparams = m[2];
  if (name === "user.setAppMetadata" || name === "user.setUserMetadata") {
    return function (keyOrPatch, value) {
      check(ex);
      if (arguments.length >= 2) {
        if (arguments.length > 2) throw new TE("api." + name + "() takes (key, value) or (patch)");
        if (typeof keyOrPatch !== "string") throw new TE("api." + name + ": key must be a string");
        return call(name, "[{" + stringify(keyOrPatch) + ":" + enc(value, "api." + name + ": value", 1, null) + "}]");
      }
      return call(name, encArgs(name, arguments, arguments.length));
    };
  }
  if (name === "fetch") {
    return function (url, init) {
      check(ex);
      const id = call(name, encArgs(name, arguments, arguments.length));
      ex.inflight++;
      return new P(function (resolve, reject) { ex.pending[id] = [resolve, reject]; });
    };
  }
  if (name === "log") {
    return function (level, message) {
      check(ex);
      return call(name, encArgs(name, [level, clip(message)], arguments.length));
    };
  }
  return function () {
    check(ex);
    return call(name, encArgs(name, arguments, arguments.length));
  };
}
// [namespace or "", method name, table row], split now, before any action code can touch String.prototype
const plan = [];
for (let i = 0; i < table.length; i++) {
  const name = table[i][0], dot = name.indexOf(".");
  plan[i] = dot < 0 ? ["", name, table[i]] : [name.slice(0, dot), name.slice(dot + 1), table[i]];
}
function buildApi(ex) {
  const top = {}, groups = create(null);
  for (let i = 0; i < plan.length; i++) {
    const ns = plan[i][0], leaf = plan[i][1], fn = method(ex, plan[i][2]);
    if (ns === "") { def(top, leaf, fn); continue; }
    let g = groups[ns];
    if (g === undefined) { g = groups[ns] = {}; def(top, ns, g); }
    def(g, leaf, fn);
  }
  const names = keys(top);
  for (let i = 0; i < names.length; i++) freeze(top[names[i]]);
  return freeze(top);
}

// Log lines are cut to their byte limit by the worker; cut a huge one here first so it fits in one call.
function clip(message) {
  if (typeof message !== "string" || message.length <= MAX_TEXT / 8) return message;
  let cut = MAX_TEXT / 8;
  const last = apply(charCodeAt, message, [cut - 1]);
  if (last >= 0xd800 && last <= 0xdbff) cut -= 1;  // never split a surrogate pair
  return apply(slice, message, [0, cut]);
}
function text(v) {
  if (typeof v === "string") return v;
  if (v !== null && typeof v === "object") {
    try { const t = stringify(v); if (typeof t === "string") return t; } catch (x) {}
  }
  try { return S(v); } catch (x) { return "[unprintable]"; }
}
function consoleAt(level) {
  return function () {
    let msg = "";
    for (let i = 0; i < arguments.length; i++) msg += (i ? " " : "") + text(arguments[i]);
    if (cur !== null && cur.active) host("console", S("[" + stringify(level) + "," + stringify(clip(msg)) + "]"));
  };
}
const console_ = {};
def(console_, "log", consoleAt("info"));
def(console_, "debug", consoleAt("debug"));
def(console_, "info", consoleAt("info"));
def(console_, "warn", consoleAt("warn"));
def(console_, "error", consoleAt("error"));
defineProp(globalThis, "console", {value: freeze(console_), writable: false, configurable: false});

function deepFreeze(v) {
  if (v !== null && typeof v === "object") {
    const ks = keys(v);
    for (let i = 0; i < ks.length; i++) deepFreeze(v[ks[i]]);
    freeze(v);
  }
  return v;
}
function require(name) {
  throw new E("require(" + stringify(S(name)) + "): modules are not available to actions; use api.fetch for HTTP");
}

// -- one execution ---------------------------------------------------------------------------
function errorInfo(e) {
  let type = "Error", message = "", stack = "";
  try {
    if (e instanceof E) {
      type = S(e.name);
      message = S(e.message);
      stack = typeof e.stack === "string" ? e.stack : type + ": " + message;
    } else {
      message = text(e);
      stack = "Error: " + message + " (a thrown value that is not an Error has no stack)";
    }
  } catch (x) {
    message = "an unprintable value was thrown";
  }
  return "[" + stringify(type) + "," + stringify(message) + "," + stringify(stack) + "]";
}
// The handler's promise settled (or it threw). The execution ends once no api.fetch it started is
// in flight, awaited or not, so the supervisor has judged every request (a fetch to a host off the
// allowlist denies the flow) before the answer: fire-and-forget is deterministic, as in Python.
function settle(ex, error) {
  if (!ex.active || ex.ending !== null) return;
  ex.ending = error === null ? "null" : error;
  finish(ex);
}
function finish(ex) {
  if (!ex.active || ex.ending === null || ex.inflight > 0) return;  // a count: no allocation (out of memory)
  ex.active = false;
  cur = null;
  host("$done", S("[" + ex.ending + "," + (oom ? "true" : "false") + "]"));
}
// Module-level code runs once per context (like a Node module); each run picks its trigger's handler.
let exported = null;
function handlerFor(names) {
  if (!config.module) return factory;
  if (exported === null) {
    const module = {exports: {}};
    exported = module;  // a module whose top level threw is not run twice
    apply(factory, undefined, [module.exports, module, require]);
  }
  const exp = exported.exports;
  for (let i = 0; i < names.length; i++) {
    const fn = exp !== null && (typeof exp === "object" || typeof exp === "function") ? exp[names[i]] : undefined;
    if (typeof fn === "function") return fn;
  }
  throw new HandlerNotFound(fileName + ": no handler found; assign exports." + names[0] +
                            " = async (event, api) => { ... } or exports." + names[names.length - 1]);
}
function run(eventText, namesText) {
  const ex = {active: true, pending: create(null), inflight: 0, ending: null};
  cur = ex;
  try {
    const fn = handlerFor(parse(namesText));
    const event = deepFreeze(parse(eventText));
    const result = apply(fn, undefined, [event, buildApi(ex)]);
    apply(then, apply(resolveP, P, [result]),
          [function () { settle(ex, null); }, function (e) { settle(ex, errorInfo(e)); }]);
  } catch (e) {
    settle(ex, errorInfo(e));
  }
}
function deliver(id, reply) {
  const ex = cur;
  if (ex === null) return;
  const p = ex.pending[id];
  if (p === undefined) return;
  delete ex.pending[id];
  ex.inflight--;
  const r = parse(reply);
  if (r[0] === null) p[0](r[1]); else p[1](fail(r[0]));
  // After the code waiting for this reply had its turn (it may start another call), see whether
  // an execution whose handler already settled can end now.
  if (ex.ending !== null) apply(then, apply(resolveP, P, [undefined]), [function () { finish(ex); }]);
}
delete globalThis.__ap_host;
return function (f) {
  factory = f;
  return function entry(op, a, b) {
    if (op === "run") return run(a, b);
    if (op === "deliver") return deliver(a, b);
  };
};
})(globalThis.__ap_host, __AP_TABLE__, __AP_CONFIG__)("""
