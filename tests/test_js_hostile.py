"""Hostile JavaScript is contained with the right ``denial.kind`` (issue 11).

Time: the engine's interrupt handler stops the action at its deadline and the
supervisor's timer kills the worker behind it (``timeout``). Memory: the
engine's limit (half the worker's cap) ends a bomb as ``memory_limit``, even
when the action catches the out-of-memory error. Recursion is a RangeError.
Prototype tricks reach nothing of the host: the context holds only the
standard ECMAScript globals and ``console``, and rewriting prototypes changes
nothing the api relies on.
"""

from __future__ import annotations

import time
from typing import Any

import psutil
import pytest

from conftest import make_runner, run
from actionpool.runner import Action, Limits, RunnerConfig

CONFIG = RunnerConfig(pool_size=1, max_workers=4, limits=Limits(action_timeout_s=1.0, memory_mb=128))

# What a fresh context offers (the engine's standard library plus console); nothing else may be reachable.
STANDARD_GLOBALS = {
    "Object", "Function", "Error", "EvalError", "RangeError", "ReferenceError", "SyntaxError", "TypeError",
    "URIError", "InternalError", "AggregateError", "SuppressedError", "Iterator", "Array", "parseInt",
    "parseFloat", "isNaN", "isFinite", "queueMicrotask", "decodeURI", "decodeURIComponent", "encodeURI",
    "encodeURIComponent", "escape", "unescape", "Infinity", "NaN", "undefined", "eval", "Number", "Boolean",
    "String", "Math", "Reflect", "Symbol", "DisposableStack", "globalThis", "BigInt", "Date", "RegExp", "JSON",
    "Proxy", "Map", "Set", "WeakMap", "WeakSet", "ArrayBuffer", "SharedArrayBuffer", "Uint8ClampedArray",
    "Int8Array", "Uint8Array", "Int16Array", "Uint16Array", "Int32Array", "Uint32Array", "BigInt64Array",
    "BigUint64Array", "Float16Array", "Float32Array", "Float64Array", "DataView", "Atomics", "Promise",
    "AsyncDisposableStack", "WeakRef", "FinalizationRegistry", "DOMException", "btoa", "atob", "performance",
    "console",
}


async def attack(source: str, **kw: Any) -> dict[str, Any]:
    async with make_runner(CONFIG) as r:
        return await run(r, [Action(slug="evil", source=source, filename="evil.js")], **kw)


@pytest.mark.parametrize("source", [
    "for (;;) {}",
    "while (true) { try { for (;;) {} } catch (e) {} finally { continue; } }",
    "exports.onExecute = async () => { await null; for (;;) {} };",
])
async def test_infinite_loop_is_a_timeout(source: str) -> None:
    started = time.monotonic()
    res = await attack(source)
    assert res["denial"]["kind"] == "timeout", res["denial"]
    assert "1s time limit" in res["denial"]["reason"]
    assert time.monotonic() - started < 15  # killed, not left spinning


@pytest.mark.parametrize("source", [
    "const hog = []; for (;;) hog.push(new Array(100000).fill(1.5));",
    "let s = 'x'.repeat(1 << 20); const keep = []; for (;;) { keep.push(s + keep.length); s = keep.join(''); }",
    # caught, freed, carried on as if nothing happened: still memory_limit
    "let hog = []; try { for (;;) hog.push(new Array(100000).fill(1.5)); } catch (e) { hog = null; }\n"
    "api.state.set('survived', true);",
    # ... and an attempt to blind the detector first
    "try { Error.prepareStackTrace = () => 'hidden'; Error.stackTraceLimit = 0; } catch (e) {}\n"
    "let hog = []; try { for (;;) hog.push(new Array(100000).fill(1.5)); } catch (e) { hog = null; }",
])
async def test_memory_bomb_is_memory_limit(source: str) -> None:
    res = await attack(source)
    assert res["denial"]["kind"] == "memory_limit", res["denial"]
    assert res["state"] == {}


# Issue 16: small allocations fill the heap to the brim, so the engine cannot even build its error object and
# throws null: no Error.prepareStackTrace runs, only the host's watch (worker/_js_oom.py) sees it. Filling the
# heap with small arrays takes a while on a busy machine: the time limit here is only a bound, each bomb ends
# by itself (a timeout would be a failure).
OOM_CONFIG = RunnerConfig(pool_size=1, max_workers=4, limits=Limits(action_timeout_s=20.0, memory_mb=128))
FILL = "let hog = [], n = 0, seen = 'nothing thrown';\ntry { for (;;) hog.push([n++]); } catch (e) { seen = e; hog = null; }\n"


@pytest.mark.parametrize("tail", [
    # caught, freed, then a flow-changing call
    "api.state.set('survived', String(seen));",
    # ... or a plain return: the JavaScript says all went well
    "if (seen !== null) throw new Error('expected the engine to throw null, got ' + seen);",
    # ... or carrying on forever: interrupted at once, not a timeout
    "for (;;) {}",
    # ... or the api call's refusal caught too
    "try { api.state.set('survived', true); } catch (e) {}\napi.log('info', 'still here');",
])
async def test_caught_out_of_memory_without_an_error_object_is_memory_limit(tail: str) -> None:
    async with make_runner(OOM_CONFIG) as r:
        res = await run(r, [Action(slug="evil", source=FILL + tail, filename="evil.js")])
    assert res["denial"]["kind"] == "memory_limit", res["denial"]
    assert res["denial"]["reason"].startswith("InternalError: out of memory"), res["denial"]
    assert res["state"] == {}
    assert not any("still here" in str(e.get("message")) for e in res["logs"]), res["logs"]


async def test_spawned_worker_watches_out_of_memory_too() -> None:
    """Without the fork template the engine is loaded after the sandbox: the watch must still be installed."""
    import dataclasses

    async with make_runner(dataclasses.replace(OOM_CONFIG, fork_template=False)) as r:
        res = await run(r, [Action(slug="evil", source=FILL + "api.state.set('survived', true);", filename="evil.js")])
    assert res["denial"]["kind"] == "memory_limit", res["denial"]
    assert res["denial"]["reason"].startswith("InternalError: out of memory"), res["denial"]
    assert res["state"] == {}


async def test_out_of_memory_in_a_handled_promise_job_is_memory_limit() -> None:
    source = ("let hog = [], n = 0;\n"
              "await Promise.resolve().then(() => { for (;;) hog.push([n++]); }).catch(() => { hog = null; });\n"
              "api.state.set('survived', true);")
    async with make_runner(OOM_CONFIG) as r:
        res = await run(r, [Action(slug="evil", source=source, filename="evil.js")])
    assert res["denial"]["kind"] == "memory_limit", res["denial"]
    assert res["state"] == {}


def test_engine_out_of_memory_is_watched_by_the_host() -> None:
    """The host-side watch is installed on this platform (else only the prelude's hook would notice)."""
    from actionpool.worker import _js, _js_oom

    assert _js.OOM_WATCH_ERROR is None
    import _quickjs

    _js_oom.reset()
    ctx = _quickjs.Context()
    ctx.set_memory_limit(8 << 20)
    assert ctx.eval("let hog = [], n = 0, e0 = 1; try { for (;;) hog.push([n++]); } catch (e) { e0 = e; hog = null; } e0") is None
    assert _js_oom.seen[0]
    _js_oom.reset()
    assert ctx.eval("try { null.x } catch (e) { String(e) }") == "TypeError: cannot read property 'x' of null"
    assert not _js_oom.seen[0]  # other errors still formatted by the real vsnprintf, and not taken for an OOM


async def test_huge_strings() -> None:
    res = await attack("const s = 'x'.repeat(2 ** 29); api.state.set('len', s.length);")
    assert res["denial"]["kind"] == "memory_limit"
    ropes = await attack("let s = 'x'; for (;;) s = s + s;")  # lazily concatenated: the length limit trips first
    assert ropes["denial"]["kind"] == "uncaught_error" and "string too long" in ropes["denial"]["reason"]
    # within the heap but beyond one message: refused at call time, the log line is truncated
    big = await attack("const s = 'y'.repeat(4 << 20);\n"
                       "try { api.state.set('big', s); } catch (e) { api.state.set('err', e.name); }\n"
                       "api.log('info', s);")
    assert big["outcome"] == "allow", big["denial"]
    assert big["state"]["evil"] == {"err": "RangeError"}
    assert len(big["logs"][0]["message"]) == 4096


async def test_deep_recursion_is_a_range_error() -> None:
    res = await attack("function down(n) { return down(n + 1) + 1; }\ndown(0);")
    assert res["denial"]["kind"] == "uncaught_error"
    assert res["denial"]["reason"] == "RangeError: Maximum call stack size exceeded"
    caught = await attack("function down(n) { return down(n + 1) + 1; }\n"
                          "try { down(0); } catch (e) { api.state.set('caught', e.name); }")
    assert caught["outcome"] == "allow" and caught["state"]["evil"] == {"caught": "RangeError"}


async def test_nothing_of_the_host_is_reachable() -> None:
    src = """
const seen = {};
const viaCtor = (function () {}).constructor.constructor('return this')();
const viaEval = (0, eval)('this');
const viaAsync = (async () => {}).constructor('return this');
const viaFunction = new Function('return globalThis')();
seen.same = viaCtor === globalThis && viaEval === globalThis && viaFunction === globalThis;
seen.globals = Object.getOwnPropertyNames(globalThis);
seen.hostName = typeof __ap_host;
seen.types = [typeof require, typeof process, typeof std, typeof os, typeof print, typeof setTimeout,
              typeof module, typeof exports, typeof Deno, typeof Bun];
const imports = [];
for (const name of ['std', 'os', 'fs', '/etc/passwd', 'node:child_process']) {
  try { await import(name); imports.push(name + ': loaded'); } catch (e) { imports.push(e.name); }
}
seen.imports = imports;
seen.apiFrozen = Object.isFrozen(api) && Object.isFrozen(api.user) && Object.isFrozen(api.cache);
seen.apiKeys = Object.keys(api).sort();
// The api's functions expose nothing either: their closure cannot be read, their source is the prelude's.
seen.callerBlocked = (() => { try { return api.deny.caller === undefined; } catch (e) { return e.name; } })();
api.state.set('seen', seen);
"""
    res = await attack(src)
    seen = res["state"]["evil"]["seen"]
    assert seen["same"] is True
    assert set(seen["globals"]) <= STANDARD_GLOBALS, set(seen["globals"]) - STANDARD_GLOBALS
    assert seen["hostName"] == "undefined"
    assert seen["types"] == ["undefined"] * 10
    assert seen["imports"] == ["ReferenceError"] * 5
    assert seen["apiFrozen"] is True
    assert seen["apiKeys"] == ["access", "accessToken", "cache", "deny", "fetch", "idToken", "log", "session",
                               "state", "user", "validation"]
    assert seen["callerBlocked"] in (True, "TypeError")


async def test_prototype_pollution_does_not_reach_the_api() -> None:
    src = """
'use strict';
Object.prototype.deny = () => { throw new Error('polluted deny'); };
Object.defineProperty(Array.prototype, '0', { set() { throw new Error('index trap'); }, configurable: true });
Object.defineProperty(Object.prototype, 'kind', { set() { throw new Error('setter trap'); }, configurable: true });
Object.prototype.toJSON = function () { return 'forged-json'; };
Array.prototype.push = () => { throw new Error('push trap'); };
Array.prototype.indexOf = () => -1;
Array.isArray = () => false;
String.prototype.slice = () => 'forged';
String.prototype.indexOf = () => -1;
JSON.stringify = () => '"forged"';
JSON.parse = () => ({ forged: true });
Object.keys = () => ['forged'];
Object.freeze = (o) => o;
Function.prototype.call = () => { throw new Error('call trap'); };
Function.prototype.apply = () => { throw new Error('apply trap'); };
Promise.prototype.then = () => { throw new Error('then trap'); };
// last, because they break the action's own property descriptors from here on
Object.defineProperty(Object.prototype, 'get', { get() { return () => 'forged'; }, configurable: true });
Reflect.defineProperty(Object.prototype, 'value', Object.assign(Object.create(null), { get() { return 'forged'; } }));
for (const k of ['api', 'state']) { try { globalThis[k] = null; } catch (e) {} }
let replaced;
try { api.deny = () => {}; replaced = 'replaced'; } catch (e) { replaced = e.name; }
api.state.set('obj', { a: [1, { b: 'c' }], d: null });
api.state.set('cached', api.cache.set('k', 'v'));
api.state.set('record', api.cache.get('k'));
api.state.set('replaced', replaced);
api.deny('still-works');
"""
    res = await attack(src)
    assert res["denial"]["kind"] == "denied" and res["denial"]["reason"] == "still-works"
    state = res["state"]["evil"]
    assert state["obj"] == {"a": [1, {"b": "c"}], "d": None}
    assert state["cached"] == {"type": "success"}
    assert state["record"]["value"] == "v"
    assert state["replaced"] == "TypeError"


async def test_polluted_promises_do_not_reach_fetch() -> None:
    src = """
Promise.prototype.then = () => { throw new Error('then trap'); };
Promise.resolve = () => { throw new Error('resolve trap'); };
Object.defineProperty(Object.prototype, 'get', { get() { return () => 'forged'; }, configurable: true });
try { await api.fetch('http://not-allowed.example/'); } catch (e) { api.state.set('fetch_error', [e.name, e.kind]); }
"""
    res = await attack(src)
    assert res["state"]["evil"] == {"fetch_error": ["ApiError", "http_fetch_denied"]}
    assert res["denial"]["kind"] == "http_fetch_denied"


async def test_pollution_stays_in_its_own_action() -> None:
    """Two actions of one tenant in one worker (tenant binding): separate contexts, separate prototypes."""
    polluter = Action(slug="polluter", source="Object.prototype.isAdmin = true; Array.prototype.evil = 1;",
                      filename="polluter.js")
    victim = Action(slug="victim", source="api.state.set('admin', ({}).isAdmin === true || [].evil === 1);",
                    filename="victim.js")
    async with make_runner(CONFIG, worker_binding="tenant", max_workers=1, pool_size=1) as r:
        res = await run(r, [polluter, victim])
        again = await run(r, [victim])
    assert res["state"] == {"victim": {"admin": False}} and again["state"] == {"victim": {"admin": False}}


async def test_js_worker_stays_single_threaded() -> None:
    """The engine starts no thread (the worker's seccomp filter would refuse one anyway)."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    async with make_runner(CONFIG) as r:
        res = await run(r, [Action(slug="t", source="await null; api.state.set('ok', 1);", filename="t.js")])
        workers = [psutil.Process(p.pid) for p in psutil.Process().children(recursive=True) if p.pid not in before]
        threads = {w.pid: w.num_threads() for w in workers if w.is_running()}
    assert res["state"] == {"t": {"ok": 1}}
    assert threads and all(n == 1 for n in threads.values()), threads
