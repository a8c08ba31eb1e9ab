#!/usr/bin/env python3
"""`make bench`: what the bridge costs per request, side by side with bare Envoy.

In one run, with interleaved rounds, it measures with wrk (Debian's package):
  direct  client -> mock upstream
  bare    client -> Envoy (same listener and routes, no filter) -> mock upstream
  bridge  client -> Envoy + filter (+ sidecar + MongoDB) -> mock upstream, with
          per-key token leases (the default)
  per-request  the bridge with LEASE_TOKENS=0: one reservation call a request
               (Envoy concurrency 1 only)
for the request shapes users send (a tiny one with a 64-token maximum, plain and
streamed; the same naming no maximum; a captured OpenClaw request, 36 KB with 11
tools and max_completion_tokens 8192), at Envoy --concurrency 1 and 2: requests/s,
p50/p99 latency and CPU per request of each process. It also measures streamed
time to first byte (curl), the .wasm size, memory at rest and under load,
listener ready time and MongoDB operations per request; then three gateways
(Envoy + sidecar pairs) on one MongoDB loaded at once, and the admin's usage
report and audit-log pages over BENCH_AUDIT_ROWS rows. It prints a table, writes
BENCHMARKS.md and ends with `bridge/bare-envoy ratio: R`: the least over every shape at concurrency 1 and
every key count of the keys runs (BENCH_KEY_COUNTS).

Loopback only; every load is bounded in time. Settings: BENCH_SECONDS (5),
BENCH_ROUNDS (3), BENCH_CONNECTIONS (32), BENCH_HONOUR_RETRY_AFTER (0: 1 holds a request back by a 503's Retry-After), BENCH_SIDECAR_LOG (warn), BENCH_AUDIT_ROWS (100000),
BENCH_ONLY=reports (only the usage report and audit-log timings) or itemise (only the filter's steps),
MONGODB_URI (else a local MongoDB-wire server is started: MONGO_SERVER names its binary, else the one
scripts/mongo.sh picks: the compiled build `make db` installs, or the PyPI build; the PyPI one in memory with a BENCH_MONGO_CACHE (12G) cache).
"""

import datetime
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
UPSTREAM_KEY = "bench-upstream-key"
ADMIN = "bench-admin-token-0123456789abcdef"
USER_KEY = "sk-bench-user-0001"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PLAIN = {"model": "gpt-5-nano", "messages": [{"role": "user", "content": "Say hello."}], "max_completion_tokens": 64}
STREAM = dict(PLAIN, stream=True)
# The same tiny request naming no maximum: its hold is the default output reservation.
CAPLESS = {"model": "gpt-5-nano", "messages": [{"role": "user", "content": "Say hello."}]}


def openclaw_body():
    """A captured OpenClaw request (36 KB: system prompt, 11 tools, max_completion_tokens
    8192) from the workplace's notes, or BENCH_OPENCLAW_BODY; None if neither is there."""
    path = os.environ.get("BENCH_OPENCLAW_BODY") or os.path.join(ROOT, "..", "shared", "notes",
                                                                 "openclaw-request.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# Request shapes, each measured on every path: (name, body).
SHAPES = [("plain", PLAIN), ("stream", STREAM), ("capless", CAPLESS)]

procs = []
# The MongoDB-wire server's pid when the bench started it (its CPU a request is then measured).
MONGO_PID = [None]
ANALYSIS_MARKER = "<!-- analysis: kept by make bench -->"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def spawn(args, env=None, log=None):
    p = subprocess.Popen(args, env=env, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
    procs.append(p)
    return p


def wait_ok(url, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.02)
    raise SystemExit(f"bench: {url} not ready within {timeout}s")


def http_json(url, body=None, token=None, method=None, timeout=10):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def cpu_ticks(pid):
    """CPU of a process and of its live children (LiteLLM's workers), in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    total = int(fields[11]) + int(fields[12])  # utime + stime
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            total += sum(cpu_ticks(int(c)) for c in f.read().split())
    except OSError:
        pass
    return total


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


LUA = """
wrk.method = "POST"
wrk.body = [==[%s]==]
wrk.headers["Content-Type"] = "application/json"
%s
done = function(summary, latency, requests)
  io.write(string.format("JSON {\\"requests\\": %%d, \\"errors\\": %%d, \\"non2xx\\": %%d, \\"us\\": %%d, \\"p50\\": %%d, \\"p99\\": %%d}\\n",
    summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, summary.duration, latency:percentile(50), latency:percentile(99)))
end
"""


# Requests spread evenly over `n` keys named prefix1..prefixN, in turn.
LUA_KEYS = """
local keys = {}
for i = 1, %d do keys[i] = "Bearer %s" .. i end
local n = 0
request = function()
  n = n + 1
  wrk.headers["Authorization"] = keys[(n %% #keys) + 1]
  return wrk.format(nil, nil, wrk.headers, wrk.body)
end
"""


# BENCH_HONOUR_RETRY_AFTER=1: each 503 holds back one next request by its
# Retry-After, as the OpenAI SDKs do (wrk alone asks again at once).
LUA_RETRY_AFTER = """
local backoffs, backoff_ms = 0, 0
response = function(status, headers, body)
  if status == 503 then
    backoffs = backoffs + 1
    backoff_ms = (tonumber(headers["Retry-After"] or headers["retry-after"] or "1") or 1) * 1000
  end
end
delay = function()
  if backoffs > 0 then backoffs = backoffs - 1; return backoff_ms end
  return 0
end
"""
HONOUR_RETRY_AFTER = os.environ.get("BENCH_HONOUR_RETRY_AFTER") == "1"


def wrk(url, body, headers, watch, seconds=None, sample=None, keys=None):
    """One wrk run: its summary, CPU us a request and peak RSS of the `watch` processes;
    `sample`, if given, is called every 0.25 s while it runs; `keys` (prefix, n) spreads
    the requests over n keys."""
    seconds = seconds or SECONDS
    hdrs = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    if keys:
        hdrs += LUA_KEYS % (keys[1], keys[0])
    if HONOUR_RETRY_AFTER:
        hdrs += LUA_RETRY_AFTER
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA % (json.dumps(body), hdrs))
        script = f.name
    before = {name: cpu_ticks(pid) for name, pid in watch.items()}
    peak = {name: 0.0 for name in watch}
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            for name, pid in watch.items():
                peak[name] = max(peak[name], rss_mib(pid))
            if sample:
                sample()
            stop.wait(0.25)

    t = threading.Thread(target=sampler)
    t.start()
    out = subprocess.run(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "10s", "-s", script, url],
                         capture_output=True, text=True, timeout=seconds + 60)
    stop.set()
    t.join()
    os.unlink(script)
    m = re.search(r"^JSON (.*)$", out.stdout, re.M)
    if not m:
        raise SystemExit(f"bench: wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    n = max(r["requests"], 1)
    r["rps"] = r["requests"] / (r["us"] / 1e6)
    r["cpu_us"] = {name: (cpu_ticks(pid) - before[name]) / CLK_TCK * 1e6 / n for name, pid in watch.items()}
    r["rss_peak"] = peak
    return r


def ttfb(url, headers, n=20):
    firsts, totals = [], []
    args = ["curl", "-s", "-o", "/dev/null", "-w", "%{time_starttransfer} %{time_total}", "-X", "POST", url,
            "-H", "content-type: application/json", "-d", json.dumps(STREAM)]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    for _ in range(n):
        a, b = subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.split()
        firsts.append(float(a) * 1000)
        totals.append(float(b) * 1000)
    return statistics.median(firsts), statistics.median(totals)


def mongo_ops(uri):
    try:
        import pymongo
        c = pymongo.MongoClient(uri, serverSelectionTimeoutMS=2000)
        ops = c.admin.command("serverStatus").get("opcounters", {})
        return sum(v for k, v in ops.items() if k in ("insert", "query", "update", "delete", "getmore", "command"))
    except Exception:
        return None


def wait_settled(uri, db, timeout=120.0):
    """Waits until the bridge has settled everything (no hold open), so a settlement
    backlog does not eat the CPU of the next, unrelated run."""
    import hashlib
    import pymongo
    keys = pymongo.MongoClient(uri)[db]["api_keys"]
    key_id = hashlib.sha256(USER_KEY.encode()).hexdigest()
    start, polls = time.time(), 0
    while time.time() < start + timeout:
        polls += 1
        doc = keys.find_one({"_id": key_id}, {"holds_n": 1, "outbox_n": 1, "leases_n": 1})
        if doc and all(doc.get(f, 0) == 0 for f in ("holds_n", "outbox_n", "leases_n")):
            break
        time.sleep(0.2)
    return time.time() - start, polls


def start_envoy(tag, bare, concurrency, env, **extra):
    port, admin = free_port(), free_port()
    cfg = os.path.join(STATE, f"{tag}-{concurrency}.json")
    e = dict(env, GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(port), ENVOY_ADMIN_PORT=str(admin),
             BRIDGE_FILTER="0" if bare else "1", ACCESS_LOG="0", **extra)
    subprocess.run([sys.executable, os.path.join(ROOT, "envoy/render.py"), cfg], env=e, check=True)
    t0 = time.time()
    p = spawn(["envoy", "-c", cfg, "--concurrency", str(concurrency), "--disable-hot-restart",
               "--log-level", "warning"], log=open(os.path.join(STATE, f"{tag}-{concurrency}.log"), "w"))
    wait_ok(f"http://127.0.0.1:{port}/healthz")
    p.admin = f"http://127.0.0.1:{admin}"
    return p, f"http://127.0.0.1:{port}", time.time() - t0


LITELLM_KEY = "sk-bench-litellm-master"
LITELLM_CONFIG = """model_list:
  - model_name: gpt-5-nano
    litellm_params:
      model: azure/gpt-5-nano
      api_base: http://127.0.0.1:%d
      api_key: %s
      api_version: 2024-12-01-preview
"""


def litellm_exe():
    """LiteLLM's proxy: LITELLM, else the one make bench installs in target/bench-venv, else PATH's."""
    for exe in (os.environ.get("LITELLM"), os.path.join(ROOT, "target/bench-venv/bin/litellm"), shutil.which("litellm")):
        if exe and os.path.exists(exe):
            return exe
    return None


def start_litellm(mock_port, workers):
    """LiteLLM's proxy in its lightest mode (no database: a master key, one model) in front of
    the same mock upstream, as the peer a user would pick instead; None if it is not installed."""
    exe = litellm_exe()
    if not exe:
        return None
    cfg = os.path.join(STATE, "litellm.yaml")
    with open(cfg, "w") as f:
        f.write(LITELLM_CONFIG % (mock_port, UPSTREAM_KEY))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "MONGODB_URI")}
    env.update(LITELLM_MASTER_KEY=LITELLM_KEY, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
    p = spawn([exe, "--config", cfg, "--host", "127.0.0.1", "--port", str(port), "--num_workers", str(workers)],
              env=env, log=open(os.path.join(STATE, f"litellm-{workers}.log"), "w"))
    wait_ok(f"http://127.0.0.1:{port}/health/liveliness", timeout=180)
    return p, f"http://127.0.0.1:{port}"


def stats(admin, prefix):
    """Envoy's counters whose names hold `prefix`, by name (without `wasmcustom.`)."""
    with urllib.request.urlopen(f"{admin}/stats?format=json&filter={prefix}", timeout=10) as r:
        out = json.loads(r.read())
    return {s["name"].removeprefix("wasmcustom."): s.get("value", 0) for s in out.get("stats", []) if "name" in s}


# The itemised steps (filter/src/itemise.rs), as the table names them.
STEPS = ["request_headers", "request_body", "body_copy", "admit", "reencode", "upstream", "draw",
         "response_headers", "response_body", "log", "root"]


def itemise(env):
    """The filter's own time per request, step by step: an Envoy (concurrency 1) loading the
    `itemise` build (each step timed with the monotonic clock inside the filter, summed in Envoy
    counters), loaded with each shape as the main runs are. Per shape: microseconds a request
    in each step."""
    wasm = os.path.join(ROOT, "target/itemise/wasm32-wasip1/release/openclaw_filter.wasm")
    if not os.path.exists(wasm):
        print("bench: no itemise build (make bench builds it); the itemised table is left out", file=sys.stderr)
        return {}
    p, url, _ = start_envoy("itemise", False, 1, dict(env, WASM_PATH=wasm))
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    # BENCH_ITEMISE_KEYS=n: the requests spread over n keys instead of one.
    spread = int(os.environ.get("BENCH_ITEMISE_KEYS", "1"))
    keys = None
    if spread > 1:
        keys = (f"sk-bench-itemise-{int(time.time())}-", spread)
        create_keys_from(f"http://{env['SIDECAR_ADDR']}", keys[0], 1, spread)
        headers = {}
    out = {}
    try:
        for kind, body in SHAPES:
            wrk(url + "/v1/chat/completions", body, headers, {"envoy": p.pid}, keys=keys)   # warm up, not counted
            time.sleep(1.0)
            urllib.request.urlopen(urllib.request.Request(p.admin + "/reset_counters", method="POST"), timeout=10)
            r = wrk(url + "/v1/chat/completions", body, headers, {"envoy": p.pid}, keys=keys)
            time.sleep(1.5)  # every VM's tick adds its sums
            c = stats(p.admin, "openclaw_bridge_step_")
            n = max(c.get("openclaw_bridge_step_log_n", 0), 1)
            us = {step: c.get(f"openclaw_bridge_step_{step}_ns", 0) / 1000 / n for step in STEPS}
            out[kind] = {"requests": n, "us": us, "envoy_cpu": r["cpu_us"]["envoy"], "rps": r["rps"],
                         "errors": r["errors"] + r["non2xx"]}
            print(f"  itemise {kind:8} {r['rps']:8.0f} req/s  filter {sum(us[s] for s in FILTER_CALLBACKS):6.1f} "
                  f"us/req  " + " ".join(f"{k} {v:.1f}" for k, v in us.items()), file=sys.stderr)
    finally:
        p.terminate()
        p.wait(timeout=30)
    return out


# The steps that are whole callbacks: their sum is all the filter's code does for a request.
FILTER_CALLBACKS = ["request_headers", "request_body", "response_headers", "response_body", "log", "root"]


def version(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except Exception:
        return "?"


def main():
    global STATE
    for tool in ("wrk", "curl", "envoy"):
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} is not installed (make bench installs wrk with apt-get)")
    STATE = tempfile.mkdtemp(prefix="bridge-bench.")
    claw = openclaw_body()
    if claw is None:
        print("bench: no OpenClaw request (set BENCH_OPENCLAW_BODY); that shape is left out", file=sys.stderr)
    elif not any(name == "openclaw" for name, _ in SHAPES):
        SHAPES.append(("openclaw", claw))
    rel = os.path.join(ROOT, "target", "release")
    wasm = os.path.join(ROOT, "target/wasm32-wasip1/release/openclaw_filter.wasm")
    started_mongo = False
    uri = os.environ.get("MONGODB_URI")
    try:
        if not uri:
            # The build scripts/mongo.sh picks (the compiled one where `make db` installed it).
            os.environ["MONGO_SERVER"] = subprocess.run([os.path.join(ROOT, "scripts/mongo.sh"), "server"],
                                                        capture_output=True, text=True, check=True).stdout.strip()
            pypi = os.path.basename(os.environ["MONGO_SERVER"]) == "secantusd-py"
            uri = subprocess.run([os.path.join(ROOT, "scripts/mongo.sh"), "start", os.path.join(STATE, "mongo")],
                                 capture_output=True, text=True, check=True,
                                 env=dict(os.environ, **({} if not pypi else {
                                     # In memory, the whole database lives in WiredTiger's cache: the
                                     # default 1G fills with a run's ~2 million audit rows
                                     # (WT_CACHE_FULL, answered as InternalError).
                                     "MONGO_STORAGE": ":memory:",
                                     "MONGO_ARGS": "--cache-size " + os.environ.get("BENCH_MONGO_CACHE", "12G")}))
                                 ).stdout.strip()
            started_mongo = True
            with open(os.path.join(STATE, "mongo", "pid")) as f:
                MONGO_PID[0] = int(f.read().strip())
        if os.environ.get("BENCH_ONLY") == "reports":
            # Only the operator's reads (BENCHMARKS.md is left as it is).
            r = report_timings(uri, f"bench_{int(time.time())}", rel)
            print(json.dumps(r))
            return
        mock_port, sidecar_port = free_port(), free_port()
        mock = spawn([os.path.join(rel, "mock-upstream"), f"127.0.0.1:{mock_port}"],
                     env=dict(os.environ, MOCK_UPSTREAM_KEY=UPSTREAM_KEY))
        db = f"bench_{int(time.time())}"
        sidecar = spawn([os.path.join(rel, "openclaw-sidecar")], env=dict(
            os.environ, MONGODB_URI=uri, MONGODB_DB=db, ADMIN_TOKEN=ADMIN,
            SIDECAR_ADDR=f"127.0.0.1:{sidecar_port}", LOG_FILE=os.path.join(STATE, "app.log"),
            LOG_LEVEL=os.environ.get("BENCH_SIDECAR_LOG", "warn")))
        env = dict(os.environ, LLM_ENDPOINT=f"http://127.0.0.1:{mock_port}", LLM_API_KEY=UPSTREAM_KEY,
                   LLM_MODEL="gpt-5-nano", SIDECAR_ADDR=f"127.0.0.1:{sidecar_port}", WASM_PATH=wasm)
        wait_ok(f"http://127.0.0.1:{mock_port}/healthz")
        wait_ok(f"http://127.0.0.1:{sidecar_port}/healthz")
        http_json(f"http://127.0.0.1:{sidecar_port}/admin/keys",
                  {"api_key": USER_KEY, "user_name": "bench", "balance_tokens": 10 ** 15}, ADMIN)

        if os.environ.get("BENCH_ONLY") == "keys":
            # Only the key-count dimension (BENCHMARKS.md is left as it is).
            rows = many_keys(uri, db, env, sidecar, mock)
            print("\n".join(render_keys(rows)))
            return
        if os.environ.get("BENCH_ONLY") == "sustained":
            # Only the sustained phase (BENCHMARKS.md is left as it is).
            rows = sustained(uri, db, env, rel, sidecar, mock)
            print("\n".join(render_sustained(rows)))
            print(sustained_line(rows))
            return
        if os.environ.get("BENCH_ONLY") == "itemise":
            # Only the filter's steps (BENCHMARKS.md is left as it is).
            print(json.dumps(itemise(env), indent=1))
            return
        direct_url = (f"http://127.0.0.1:{mock_port}/openai/deployments/gpt-5-nano/chat/completions"
                      f"?api-version=2024-12-01-preview")
        results = []   # rows of the table
        db_watch = {"mongo": MONGO_PID[0]} if MONGO_PID[0] else {}
        extras = {}
        for conc in (1, 2):
            bare, bare_url, bare_ready = start_envoy("bare", True, conc, env)
            bridge, bridge_url, bridge_ready = start_envoy("bridge", False, conc, env)
            per_req = start_envoy("per-request", False, conc, env, LEASE_TOKENS="0") if conc == 1 else None
            # LiteLLM with as many workers as Envoy has.
            lite = start_litellm(mock_port, conc)
            extras[conc] = {"ready": {"bare": bare_ready, "bridge": bridge_ready},
                            "rest": {"bare": rss_mib(bare.pid), "bridge": rss_mib(bridge.pid),
                                     "sidecar": rss_mib(sidecar.pid)}}
            targets = {
                "direct": (direct_url, {"api-key": UPSTREAM_KEY}, {"mock": mock.pid}),
                "bare": (bare_url + "/v1/chat/completions", {}, {"envoy": bare.pid, "mock": mock.pid}),
                "bridge": (bridge_url + "/v1/chat/completions", {"Authorization": f"Bearer {USER_KEY}"},
                           dict({"envoy": bridge.pid, "mock": mock.pid, "sidecar": sidecar.pid}, **db_watch)),
            }
            if lite:
                targets["litellm"] = (lite[1] + "/v1/chat/completions", {"Authorization": f"Bearer {LITELLM_KEY}"},
                                      {"envoy": lite[0].pid, "mock": mock.pid})
            if per_req:
                targets["per-request"] = (per_req[1] + "/v1/chat/completions", {"Authorization": f"Bearer {USER_KEY}"},
                                          dict({"envoy": per_req[0].pid, "mock": mock.pid, "sidecar": sidecar.pid},
                                               **db_watch))
            # Warm up: the bridge's first requests create VMs' state and connections.
            for name, (url, headers, watch) in targets.items():
                subprocess.run(["wrk", "-t1", "-c4", "-d1s", url], capture_output=True, timeout=30)
            samples = {}
            for rnd in range(ROUNDS):
                for kind, body in SHAPES:
                    for name, (url, headers, watch) in targets.items():
                        if name == "per-request" and kind not in ("plain", "stream"):
                            continue
                        billed = name in ("bridge", "per-request")
                        ops0 = mongo_ops(uri) if billed else None
                        r = wrk(url, body, headers, watch)
                        polls = 0
                        if billed:
                            r["drain_s"], polls = wait_settled(uri, db)
                        if ops0 is not None:
                            ops1 = mongo_ops(uri)
                            # The wait's own reads (and serverStatus itself) are not the bridge's.
                            r["mongo_ops"] = None if ops1 is None else (ops1 - ops0 - polls - 1) / max(r["requests"], 1)
                        samples.setdefault((kind, name), []).append(r)
                        print(f"  c={conc} round {rnd + 1} {kind:6} {name:11} {r['rps']:8.0f} req/s "
                              f"p50 {r['p50'] / 1000:6.2f} ms  errors {r['errors'] + r['non2xx']}", file=sys.stderr)
            for (kind, name), rs in samples.items():
                med = lambda f: statistics.median(f(r) for r in rs)
                row = {"conc": conc, "kind": kind, "target": name, "rps": med(lambda r: r["rps"]),
                       "p50": med(lambda r: r["p50"]) / 1000, "p99": med(lambda r: r["p99"]) / 1000,
                       "errors": sum(r["errors"] + r["non2xx"] for r in rs),
                       "envoy_cpu": med(lambda r: r["cpu_us"].get("envoy", 0)),
                       "sidecar_cpu": med(lambda r: r["cpu_us"].get("sidecar", 0)),
                       "mongo_cpu": med(lambda r: r["cpu_us"].get("mongo", 0)),
                       "envoy_rss": max(r["rss_peak"].get("envoy", 0) for r in rs),
                       "sidecar_rss": max(r["rss_peak"].get("sidecar", 0) for r in rs)}
                if name in ("bridge", "per-request") and all(r.get("mongo_ops") is not None for r in rs):
                    row["mongo_ops"] = med(lambda r: r["mongo_ops"])
                if name in ("bridge", "per-request"):
                    row["drain_s"] = med(lambda r: r["drain_s"])
                results.append(row)
            extras[conc]["ttfb"] = {name: ttfb(url, headers) for name, (url, headers, _) in targets.items()}
            # Stop as the README says: once the last leases are closed and settled
            # (a lease still open when Envoy stops is charged at the TTL).
            wait_settled(uri, db)
            for p in (bare, bridge) + ((per_req[0],) if per_req else ()) + ((lite[0],) if lite else ()):
                p.terminate()
                p.wait(timeout=30)

        steps = itemise(env)
        tenants = many_keys(uri, db, env, sidecar, mock)
        many = three_gateways(uri, db, env, rel, sidecar, mock)
        held = sustained(uri, db, env, rel, sidecar, mock)
        try:
            reports = report_timings(uri, db, rel)
        except (Exception, SystemExit) as e:  # the operator's reads are their own phase: the rest still counts
            print(f"bench: the operator's reads were not measured: {e}", file=sys.stderr)
            reports = {"error": str(e).splitlines()[0][:200] if str(e) else type(e).__name__}
        report = render_report(results, extras, wasm, many, reports, steps, held, tenants)
        print(report)
        path = os.path.join(ROOT, "BENCHMARKS.md")
        # Keep the hand-written analysis below the marker across runs.
        kept = ""
        if os.path.exists(path):
            with open(path) as f:
                old = f.read()
            if ANALYSIS_MARKER in old:
                kept = "\n" + ANALYSIS_MARKER + old.split(ANALYSIS_MARKER, 1)[1]
        with open(path, "w") as f:
            f.write(report + kept)
        print(ratio_line(results, tenants))
        print(sustained_line(held))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if started_mongo:
            subprocess.run([os.path.join(ROOT, "scripts/mongo.sh"), "stop", os.path.join(STATE, "mongo")])


def three_gateways(uri, db, env, rel, sidecar, mock):
    """Three Envoy + sidecar pairs on one MongoDB, loaded at once (a wrk each, a third
    of the connections each), for the tiny and the OpenClaw-shaped request: the answers
    a second of all three, errors (a 429 or 503 counts), MongoDB operations a request."""
    pairs = [(sidecar, env)] + extra_sidecars(2, uri, db, rel, env)
    envoys = [start_envoy(f"gateway{i}", False, 1, e) for i, (_, e) in enumerate(pairs)]
    global CONNECTIONS
    connections, CONNECTIONS = CONNECTIONS, max(CONNECTIONS // 3, 1)
    rows = []
    try:
        for kind, body in [s for s in SHAPES if s[0] in ("plain", "openclaw")]:
            runs = []
            for _ in range(ROUNDS):
                ops0 = mongo_ops(uri)
                out = [None] * 3

                def one(i):
                    watch = {"envoy": envoys[i][0].pid, "sidecar": pairs[i][0].pid, "mock": mock.pid}
                    out[i] = wrk(envoys[i][1] + "/v1/chat/completions", body,
                                 {"Authorization": f"Bearer {USER_KEY}"}, watch)
                threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                drain, polls = wait_settled(uri, db)
                ops1 = mongo_ops(uri)
                n = sum(r["requests"] for r in out)
                runs.append({"rps": sum(r["rps"] for r in out), "errors": sum(r["errors"] + r["non2xx"] for r in out),
                             "p50": statistics.median(r["p50"] for r in out) / 1000,
                             "p99": max(r["p99"] for r in out) / 1000,
                             "mongo_ops": None if None in (ops0, ops1) else (ops1 - ops0 - polls - 1) / max(n, 1),
                             "drain_s": drain})
                print(f"  3 gateways {kind:8} {runs[-1]['rps']:8.0f} req/s errors {runs[-1]['errors']}", file=sys.stderr)
            med = lambda f: statistics.median(f(r) for r in runs)
            rows.append({"kind": kind, "rps": med(lambda r: r["rps"]), "errors": sum(r["errors"] for r in runs),
                         "p50": med(lambda r: r["p50"]), "p99": med(lambda r: r["p99"]),
                         "mongo_ops": None if any(r["mongo_ops"] is None for r in runs) else med(lambda r: r["mongo_ops"]),
                         "drain_s": med(lambda r: r["drain_s"])})
    finally:
        CONNECTIONS = connections
        for p, _, _ in envoys:
            p.terminate()
            p.wait(timeout=30)
        for p, _ in pairs[1:]:
            p.terminate()
            p.wait(timeout=30)
    return rows


SUSTAIN_SECONDS = int(os.environ.get("BENCH_SUSTAIN_SECONDS", "60"))
TRACE = os.environ.get("BENCH_TRACE") == "1"   # the keys runs print Envoy's backlog every 0.25 s
KEY_SHAPES = os.environ.get("BENCH_KEY_SHAPES", "capless,openclaw").split(",")
KEY_COUNTS = [int(n) for n in os.environ.get("BENCH_KEY_COUNTS", "1,100,1000,10000").split(",")]


def many_keys(uri, db, env, sidecar, mock):
    """The tiny capless and the OpenClaw request spread evenly over 1, 100, 1,000 and
    10,000 keys (BENCH_KEY_COUNTS), bridge and bare Envoy (concurrency 1) in turn: the
    bridge's 2xx/s against bare's, and how long after the load every answered request
    had its audit row."""
    import pymongo
    audit = pymongo.MongoClient(uri)[db]["audit_logs"]
    sidecar_url = f"http://{env['SIDECAR_ADDR']}"
    bare, bare_url, _ = start_envoy("keys-bare", True, 1, env)
    bridge, bridge_url, _ = start_envoy("keys-bridge", False, 1, env)
    rows, made = [], 0
    prefix = f"sk-bench-tenant-{int(time.time())}-"
    try:
        for n in KEY_COUNTS:
            if n > made:
                t0 = time.time()
                create_keys_from(sidecar_url, prefix, made + 1, n)
                print(f"  keys: {n} created ({time.time() - t0:.0f} s)", file=sys.stderr)
                made = n
            for (kind, body), warm in [(s, w) for s in SHAPES if s[0] in KEY_SHAPES for w in (False, True)]:
                runs = []
                for _ in range(ROUNDS):
                    b = wrk(bare_url + "/v1/chat/completions", body, {}, {"envoy": bare.pid}, keys=(prefix, n))
                    before = audit.estimated_document_count()
                    answered = 0
                    if warm:
                        # Every key active: the same load as long again just before, so each
                        # key's lease is live when the timed run starts (counted in the lag).
                        w = wrk(bridge_url + "/v1/chat/completions", body, {}, {"envoy": bridge.pid}, keys=(prefix, n))
                        answered += w["requests"] - w["non2xx"]
                    classes = answered_by_class(bridge.admin)
                    ops_before, db_before = ledger_ops(sidecar_url), mongo_ops(uri)
                    watch = {"envoy": bridge.pid, "sidecar": sidecar.pid, "mongodb": MONGO_PID[0], "mock": mock.pid}
                    trace = []
                    t0 = time.time()

                    def sample():
                        if TRACE:
                            trace.append(f"{time.time() - t0:.1f}s {answered_by_class(bridge.admin)} backlog "
                                         f"{gauge(bridge.admin, 'openclaw_bridge_settle_backlog')} oldest "
                                         f"{gauge(bridge.admin, 'openclaw_bridge_settle_oldest_ms')} ms")
                    r = wrk(bridge_url + "/v1/chat/completions", body, {}, {k: v for k, v in watch.items() if v},
                            keys=(prefix, n), sample=sample)
                    for line in trace:
                        print("    trace " + line, file=sys.stderr)
                    end = time.time()
                    after = answered_by_class(bridge.admin)
                    refused = {c: after[c] - classes.get(c, 0) for c in after if c != "2xx" and after[c] > classes.get(c, 0)}
                    answered += r["requests"] - r["non2xx"]
                    timed = r["requests"] - r["non2xx"]
                    lag = None
                    while time.time() < end + 120:
                        if audit.estimated_document_count() - before >= answered:
                            lag = time.time() - end
                            break
                        time.sleep(0.25)
                    if lag is None:
                        # Let the backlog drain before the next run, but say it was not in time.
                        wait_until(lambda: audit.estimated_document_count() - before >= answered, 300)
                    runs.append({"bare": (b["requests"] - b["non2xx"]) / (b["us"] / 1e6),
                                 "bridge": timed / (r["us"] / 1e6), "errors": r["non2xx"] + r["errors"],
                                 "refused": refused, "lag": lag,
                                 "ops": ops_between(ops_before, ledger_ops(sidecar_url), timed),
                                 "db_ops": ((mongo_ops(uri) or 0) - (db_before or 0)) / max(timed, 1),
                                 # CPU us per answered request (wrk's figures are per request sent).
                                 "cpu": {k: v * r["requests"] / max(timed, 1) for k, v in r["cpu_us"].items()}})
                med = lambda f: statistics.median(f(x) for x in runs)
                lags = [x["lag"] for x in runs]
                row = {"keys": n, "kind": kind, "warm": warm, "bare": med(lambda x: x["bare"]),
                       "bridge": med(lambda x: x["bridge"]), "errors": sum(x["errors"] for x in runs),
                       "refused": " ".join(f"{c} {sum(x['refused'].get(c, 0) for x in runs)}"
                                           for c in sorted({c for x in runs for c in x["refused"]})) or "none",
                       "lag": None if None in lags else max(lags), "ops": runs[-1]["ops"], "cpu": runs[-1]["cpu"],
                       "db_ops": runs[-1]["db_ops"]}
                rows.append(row)
                print(f"  keys {n:6} {kind:8} {'warm' if warm else 'cold'} bridge {row['bridge']:8.0f} "
                      f"bare {row['bare']:8.0f} ({row['bridge'] / row['bare']:.2f}x) errors {row['errors']} "
                      f"({row['refused']}) lag {row['lag']}", file=sys.stderr)
                print(f"    MongoDB ops per answered: {row['db_ops']:.2f}; CPU us per answered: "
                      + ", ".join(f"{k} {v:.0f}" for k, v in row["cpu"].items()),
                      file=sys.stderr)
                print("    ledger per 1,000 answered (calls, ms a call): " + ", ".join(
                    f"{op} {c:.0f} x {ms:.1f}" for op, (c, ms) in sorted(row["ops"].items())), file=sys.stderr)
    finally:
        for p in (bare, bridge):
            p.terminate()
            p.wait(timeout=30)
    return rows


def create_keys_from(sidecar_url, prefix, first, last):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        http_json(f"{sidecar_url}/admin/keys",
                  {"api_key": f"{prefix}{i}", "user_name": f"tenant {i}", "balance_tokens": 10 ** 12}, ADMIN)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(first, last + 1)))


def wait_until(done, timeout):
    end = time.time() + timeout
    while time.time() < end and not done():
        time.sleep(0.5)


def render_keys(rows):
    lines = ["", f"Many tenants: requests spread evenly over N keys, Envoy concurrency 1, {CONNECTIONS} connections, "
             f"{SECONDS} s a run, {ROUNDS} rounds (bare and bridge interleaved), medians; lag is the longest "
             "over the rounds from the load's end until every answered request had its audit row. Cold: the "
             "keys had no lease when the run began; warm: the same load ran as long again just before it "
             "(every key active), and the lag counts both.", "",
             "| keys | body | keys were | bare 2xx/s | bridge 2xx/s | vs bare | errors | answered not 2xx | lag s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lag = "not within 120" if r["lag"] is None else f"{r['lag']:.1f}"
        lines.append(f"| {r['keys']:,} | {r['kind']} | {'warm' if r.get('warm') else 'cold'} | {r['bare']:.0f} "
                     f"| {r['bridge']:.0f} | {r['bridge'] / r['bare']:.2f}x | {r['errors']} | {r.get('refused', '-')} | {lag} |")
    ops = sorted({op for r in rows for op in r.get("ops", {})})
    if ops:
        lines += ["", "The sidecar's ledger calls during the timed run (its last round): calls per 1,000 answered "
                  "requests x ms a call. `lease` is a grant (with the close it replaces); `settle` is one "
                  "control or records call, made of the steps after it.", "",
                  "| keys | body | keys were | " + " | ".join(ops) + " | MongoDB ops a request | CPU us a request: "
                  "Envoy / sidecar / MongoDB |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in ops) + " | --- | --- |"]
        for r in rows:
            cells = [f"{r['ops'][op][0]:.0f} x {r['ops'][op][1]:.1f}" if op in r.get("ops", {}) else "-" for op in ops]
            cpu = r.get("cpu", {})
            cells.append(f"{r.get('db_ops', 0):.2f}")
            cells.append(" / ".join(f"{cpu[k]:.0f}" if k in cpu else "-" for k in ("envoy", "sidecar", "mongodb")))
            lines.append(f"| {r['keys']:,} | {r['kind']} | {'warm' if r.get('warm') else 'cold'} | " + " | ".join(cells) + " |")
    return lines


def extra_sidecars(n, uri, db, rel, env):
    """`n` more sidecars on the same database: (process, the Envoy environment that uses it)."""
    pairs = []
    for i in range(n):
        port = free_port()
        p = spawn([os.path.join(rel, "openclaw-sidecar")], env=dict(
            os.environ, MONGODB_URI=uri, MONGODB_DB=db, ADMIN_TOKEN=ADMIN, SIDECAR_ADDR=f"127.0.0.1:{port}",
            LOG_FILE=os.path.join(STATE, f"app-{len(procs)}.log"), LOG_LEVEL=os.environ.get("BENCH_SIDECAR_LOG", "warn")))
        wait_ok(f"http://127.0.0.1:{port}/healthz")
        pairs.append((p, dict(env, SIDECAR_ADDR=f"127.0.0.1:{port}")))
    return pairs


def answered_by_class(admin):
    """Envoy's downstream answers so far by status class: {"2xx": n, "4xx": n, "5xx": n, ...}."""
    try:
        with urllib.request.urlopen(f"{admin}/stats?filter=^http\\.gateway\\.downstream_rq_[0-9]xx$", timeout=2) as r:
            return {m.group(1): int(m.group(2)) for m in re.finditer(r"downstream_rq_(\dxx): (\d+)", r.read().decode())}
    except OSError:
        return {}


def ledger_ops(sidecar_url):
    """The sidecar's ledger operations so far: {op: (calls, seconds)} from its metrics."""
    req = urllib.request.Request(f"{sidecar_url}/admin/metrics")
    req.add_header("authorization", f"Bearer {ADMIN}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    calls = {m.group(1): int(m.group(2)) for m in
             re.finditer(r'openclaw_bridge_ledger_seconds_count\{op="(\w+)"\} (\d+)', text)}
    secs = {m.group(1): float(m.group(2)) for m in
            re.finditer(r'openclaw_bridge_ledger_seconds_sum\{op="(\w+)"\} ([0-9.e+-]+)', text)}
    return {op: (n, secs.get(op, 0.0)) for op, n in calls.items()}


def ops_between(before, after, answered):
    """Per op between two `ledger_ops` readings: calls per 1,000 answered requests and ms a call."""
    out = {}
    for op, (n, s) in after.items():
        n0, s0 = before.get(op, (0, 0.0))
        if n > n0:
            out[op] = ((n - n0) * 1000 / max(answered, 1), (s - s0) * 1000 / (n - n0))
    return out


def gauge(admin, name):
    try:
        with urllib.request.urlopen(f"{admin}/stats?filter={name}", timeout=2) as r:
            m = re.search(r": (-?\d+)", r.read().decode())
            return int(m.group(1)) if m else 0
    except OSError:
        return 0


def sustained(uri, db, env, rel, sidecar, mock):
    """Load held for SUSTAIN_SECONDS on a fresh key, on one gateway and on three, for the tiny
    capless and the OpenClaw request, beside a bare Envoy's run of the same length: what was
    answered, what the ledger settled (audit rows of the key) and how long after the load it
    took, the settled rate against bare Envoy's, Envoy's memory, the backlog's peak, and the
    rows charged at estimate."""
    import hashlib
    import pymongo
    audit = pymongo.MongoClient(uri)[db]["audit_logs"]
    global CONNECTIONS
    connections = CONNECTIONS
    more = extra_sidecars(2, uri, db, rel, env)
    sidecar_url = f"http://{env['SIDECAR_ADDR']}"
    rows = []
    try:
        shapes = os.environ.get("BENCH_SUSTAIN_SHAPES", "capless,openclaw").split(",")
        for kind, body in [s for s in SHAPES if s[0] in shapes]:
            bare, bare_url, _ = start_envoy("sustain-bare", True, 1, env)
            CONNECTIONS = connections
            b = wrk(bare_url + "/v1/chat/completions", body, {}, {"envoy": bare.pid}, SUSTAIN_SECONDS)
            bare.terminate()
            bare.wait(timeout=30)
            bare_rate = (b["requests"] - b["non2xx"]) / (b["us"] / 1e6)
            print(f"  sustained {kind:8} bare      {bare_rate:8.0f} 2xx/s", file=sys.stderr)
            for n in [int(g) for g in os.environ.get("BENCH_SUSTAIN_GATEWAYS", "1,3").split(",")]:
                key = f"sk-bench-sustain-{kind}-{n}-{int(time.time())}"
                http_json(f"{sidecar_url}/admin/keys",
                          {"api_key": key, "user_name": "sustain", "balance_tokens": 10 ** 15}, ADMIN)
                key_id = hashlib.sha256(key.encode()).hexdigest()
                envs = [env] + [e for _, e in more[:n - 1]]
                envoys = [start_envoy(f"sustain-{kind}-{n}-{i}", False, 1, e) for i, e in enumerate(envs)]
                rss0 = sum(rss_mib(p.pid) for p, _, _ in envoys)
                peak = {"backlog": 0, "rss": rss0}

                def sample():
                    peak["backlog"] = max(peak["backlog"], sum(gauge(p.admin, "openclaw_bridge_settle_backlog")
                                                               for p, _, _ in envoys))
                    peak["rss"] = max(peak["rss"], sum(rss_mib(p.pid) for p, _, _ in envoys))

                out = [None] * n
                CONNECTIONS = max(connections // n, 1)

                def one(i):
                    out[i] = wrk(envoys[i][1] + "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"},
                                 {"envoy": envoys[i][0].pid}, SUSTAIN_SECONDS, sample if i == 0 else None)
                threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                end = time.time()
                answered = sum(r["requests"] - r["non2xx"] for r in out)
                refused = sum(r["non2xx"] for r in out)
                own = {"key_id": key_id, "expired_hold": {"$ne": True}}
                # Settled once the Envoys hold nothing unsettled and the key nothing open (cheap
                # reads: counting the rows themselves on every poll slowed the database down).
                keys = audit.database["api_keys"]
                lag = None
                while time.time() < end + 120:
                    pending = sum(gauge(p.admin, "openclaw_bridge_pending_settlements") for p, _, _ in envoys)
                    doc = keys.find_one({"_id": key_id}, {"holds_n": 1, "outbox_n": 1, "leases_n": 1}) or {}
                    if pending == 0 and all(doc.get(f, 0) == 0 for f in ("holds_n", "outbox_n", "leases_n")):
                        lag = time.time() - end
                        break
                    time.sleep(0.5)
                settled = audit.count_documents(own)
                estimate = audit.count_documents({"key_id": key_id, "usage_source": "estimate"})
                span = SUSTAIN_SECONDS + (lag if lag is not None else 120)
                row = {"kind": kind, "gateways": n, "answered_rps": answered / SUSTAIN_SECONDS, "answered": answered,
                       "refused": refused, "errors": sum(r["errors"] for r in out), "rows": settled, "lag_s": lag,
                       "settled_rps": settled / span, "bare_rps": bare_rate, "rss0": rss0, "rss_peak": peak["rss"],
                       "backlog_peak": peak["backlog"], "estimate_rows": estimate}
                rows.append(row)
                print(f"  sustained {kind:8} {n} gw     {row['answered_rps']:8.0f} 2xx/s, {refused} refused, "
                      f"{settled}/{answered} rows, lag {lag}, settled {row['settled_rps']:.0f}/s "
                      f"({row['settled_rps'] / bare_rate:.2f}x bare), backlog peak {peak['backlog']}, "
                      f"{estimate} at estimate", file=sys.stderr)
                for p, _, _ in envoys:
                    p.terminate()
                    p.wait(timeout=30)
    finally:
        CONNECTIONS = connections
        for p, _ in more:
            p.terminate()
            p.wait(timeout=30)
    return rows


def render_sustained(rows):
    lines = ["", f"Sustained load: {SUSTAIN_SECONDS} s on a fresh key, Envoy concurrency 1 per gateway, "
             f"{CONNECTIONS} connections in all; bare Envoy alone on the same mock for the same time. "
             "Settled/s is the key's own audit rows over the load plus the lag after it until every answered "
             "request had its row. Requests past the settlement bound are answered 503 (refused).", "",
             "| body | gateways | answered 2xx/s | refused 503 | audit rows / answered | lag s after load "
             "| settled/s | vs bare 2xx/s | Envoy RSS MiB start / peak | backlog peak | rows at estimate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lag = "not within 120" if r["lag_s"] is None else f"{r['lag_s']:.1f}"
        lines.append(f"| {r['kind']} | {r['gateways']} | {r['answered_rps']:.0f} | {r['refused']} "
                     f"| {r['rows']:,} / {r['answered']:,} | {lag} | {r['settled_rps']:.0f} "
                     f"| {r['settled_rps'] / r['bare_rps']:.2f}x ({r['bare_rps']:.0f}) "
                     f"| {r['rss0']:.0f} / {r['rss_peak']:.0f} | {r['backlog_peak']} | {r['estimate_rows']} |")
    return lines


def sustained_line(rows):
    if not rows:
        return "sustained settled/bare-envoy ratio: -"
    return f"sustained settled/bare-envoy ratio: {min(r['settled_rps'] / r['bare_rps'] for r in rows):.2f}"


def report_timings(uri, db, rel):
    """The operator's reads over many audit rows: BENCH_AUDIT_ROWS (100,000) rows over
    100 keys, 4 models and 30 days in a database of their own (with a sidecar of its
    own), then the median of 5 answers of each: a usage report grouped by key, model
    and day, and the audit log's first and a later page of 100 rows."""
    import pymongo
    n = int(os.environ.get("BENCH_AUDIT_ROWS", "100000"))
    db = f"{db}_reports"
    port = free_port()
    spawn([os.path.join(rel, "openclaw-sidecar")], env=dict(
        os.environ, MONGODB_URI=uri, MONGODB_DB=db, ADMIN_TOKEN=ADMIN, SIDECAR_ADDR=f"127.0.0.1:{port}",
        LOG_FILE=os.path.join(STATE, "app-reports.log"), LOG_LEVEL="warn"))
    sidecar_url = f"http://127.0.0.1:{port}"
    wait_ok(sidecar_url + "/healthz")
    audit = pymongo.MongoClient(uri)[db]["audit_logs"]
    start = datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)
    batch = []
    t0 = time.time()
    for i in range(n):
        batch.append({"timestamp": start + datetime.timedelta(seconds=i * 30 * 86400 // max(n, 1)),
                      "request_id": f"bench-row-{i}", "key_id": f"{i % 100:064x}", "user_id": f"user-{i % 100}",
                      "api_key": "sk-ben...0001", "model": ["gpt-5-nano", "gpt-5", "gpt-4.1", "o4-mini"][i % 4],
                      "input_tokens": 100, "output_tokens": 20, "total_tokens": 120, "duration_ms": 10,
                      "status_code": 200, "stream": False, "usage_source": "upstream", "expired_hold": False,
                      "reserved_tokens": 200})
        if len(batch) == 5000:
            audit.insert_many(batch, ordered=False)
            batch = []
    if batch:
        audit.insert_many(batch, ordered=False)
    inserted = time.time() - t0

    def timed(path):
        times = []
        body = None
        for _ in range(5):
            t = time.time()
            body = http_json(sidecar_url + path, token=ADMIN, timeout=600)
            times.append((time.time() - t) * 1000)
        return statistics.median(times), body

    usage_ms, usage = timed("/admin/usage?group_by=key,model,day")
    first_ms, first = timed("/admin/audit_logs?limit=100")
    later_ms = None
    cursor = first.get("next_cursor")
    for _ in range(20):
        if not cursor:
            break
        page = http_json(sidecar_url + f"/admin/audit_logs?limit=100&cursor={cursor}", token=ADMIN, timeout=600)
        cursor = page.get("next_cursor")
    if cursor:
        later_ms, _ = timed(f"/admin/audit_logs?limit=100&cursor={cursor}")
    print(f"  {n} audit rows: usage report {usage_ms:.0f} ms ({len(usage['data'])} rows), "
          f"first page {first_ms:.0f} ms", file=sys.stderr)
    return {"rows": n, "insert_s": inserted, "usage_ms": usage_ms, "usage_groups": len(usage["data"]),
            "first_ms": first_ms, "later_ms": later_ms}


def mongo_name():
    if os.environ.get("MONGODB_URI"):
        return "the server at MONGODB_URI"
    server = os.environ.get("MONGO_SERVER", "secantusd-py")
    if os.path.basename(server) != "secantusd-py":
        return f"SecantusDB compiled build (`{os.path.basename(server)}`)"
    return "SecantusDB 0.7.0b3 (PyPI build, `secantusd-py`)"


def ratio_line(results, tenants=()):
    """The one figure: the bridge against bare Envoy at its worst, the minimum over every
    shape at concurrency 1 and every key count of the keys runs (cold and warm), naming
    where it was."""
    rate = lambda kind, t: next((r["rps"] for r in results if (r["conc"], r["kind"], r["target"]) == (1, kind, t)), None)
    ratios = [(rate(k, "bridge") / rate(k, "bare"), f"{k}, 1 key")
              for k in sorted({r["kind"] for r in results}) if rate(k, "bridge") and rate(k, "bare")]
    ratios += [(t["bridge"] / t["bare"], f"{t['kind']}, {t['keys']:,} keys {'warm' if t.get('warm') else 'cold'}")
               for t in tenants if t["bare"]]
    if not ratios:
        return "bridge/bare-envoy ratio: -"
    worst = min(ratios)
    return f"bridge/bare-envoy ratio: {worst[0]:.2f} (the least of {len(ratios)}: {worst[1]})"


STEP_NAMES = {
    "request_headers": "request headers (route, key hash, request id, header edits)",
    "body_copy": "copy of the body out of Envoy",
    "admit": "parse, checks, estimate (less re-encoding)",
    "reencode": "splicing the changes into the body",
    "upstream": "rewritten body and upstream headers into Envoy",
    "draw": "lease slot: read, decide, compare-and-swap",
    "request_body": "rest of the body callback",
    "response_headers": "response headers (status, meter set-up, request id header)",
    "response_body": "response body (chunk copy, metering)",
    "log": "end of request (charge, settlement record)",
    "root": "root: ticks, batches, replies (per request)",
}


def render_steps(steps, results):
    """The itemised table: microseconds a request in each of the filter's steps, per shape."""
    kinds = list(steps)
    cpu = lambda kind, target: next((r["envoy_cpu"] for r in results
                                     if (r["conc"], r["kind"], r["target"]) == (1, kind, target)), float("nan"))
    lines = ["The filter's own time per request, step by step (Envoy concurrency 1, the `itemise` build: each "
             "step timed inside the filter with the monotonic clock; microseconds a request):", "",
             "| step | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]

    def row(label, f):
        lines.append(f"| {label} | " + " | ".join(f(k) for k in kinds) + " |")

    for step in ["request_headers", "body_copy", "admit", "reencode", "upstream", "draw", "request_body",
                 "response_headers", "response_body", "log", "root"]:
        def value(k, step=step):
            us = steps[k]["us"]
            if step == "admit":
                return f"{us['admit'] - us['reencode']:.1f}"
            if step == "request_body":
                inner = sum(us[s] for s in ("body_copy", "admit", "upstream", "draw"))
                return f"{us['request_body'] - inner:.1f}"
            return f"{us[step]:.1f}"
        row(STEP_NAMES[step], value)
    total = lambda k: sum(steps[k]["us"][s] for s in FILTER_CALLBACKS)
    row("**the filter's code, all callbacks**", lambda k: f"**{total(k):.1f}**")
    row("Envoy CPU added by the filter (bridge - bare, main table)",
        lambda k: f"{cpu(k, 'bridge') - cpu(k, 'bare'):.0f}")
    row("of which outside the filter's code (V8 entry/exit, host calls' Envoy side, buffering)",
        lambda k: f"{cpu(k, 'bridge') - cpu(k, 'bare') - total(k):.0f}")
    return lines


def render_report(results, extras, wasm, many, reports, steps=None, held=(), tenants=()):
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    lines = [
        "# Benchmarks",
        "",
        f"Run by `make bench` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
        f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}; "
        f"{version(['envoy', '--version']).split('version: ')[-1]}; {version(['rustc', '--version'])}; "
        f"MongoDB: {mongo_name()}.",
        f"wrk: 1 thread, {CONNECTIONS} connections, {SECONDS} s a run, {ROUNDS} interleaved rounds, medians shown. "
        "Everything (load generator, Envoy, mock upstream, sidecar, MongoDB) shares the same cores, "
        "so ratios matter, absolutes drift.",
        "",
        "| Envoy conc. | body | path | req/s | vs bare | p50 ms | p99 ms | added p50 / p99 ms | errors "
        "| proxy CPU us/req | sidecar CPU us/req | MongoDB CPU us/req | MongoDB ops/req | settled s after load "
        "| proxy RSS MiB (load) | sidecar RSS MiB (load) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        b = next(x for x in results if (x["conc"], x["kind"], x["target"]) == (r["conc"], r["kind"], "bare"))
        added = "-" if r["target"] in ("bare", "direct") else f"{r['p50'] - b['p50']:+.2f} / {r['p99'] - b['p99']:+.2f}"
        lines.append(
            f"| {r['conc']} | {r['kind']} | {r['target']} | {r['rps']:.0f} | {r['rps'] / b['rps']:.2f}x | {r['p50']:.2f} "
            f"| {r['p99']:.2f} | {added} | {r['errors']} | {r['envoy_cpu']:.0f} | {r['sidecar_cpu']:.0f} "
            f"| {r['mongo_cpu']:.0f} "
            f"| {r.get('mongo_ops', float('nan')):.2f} | {r.get('drain_s', float('nan')):.1f} "
            f"| {r['envoy_rss']:.0f} | {r['sidecar_rss']:.0f} |")
    lines += ["", "| Envoy conc. | path | streamed TTFB ms (median of 20) | streamed total ms | listener ready s "
              "| Envoy RSS MiB at rest |", "| --- | --- | --- | --- | --- | --- |"]
    for conc, ex in extras.items():
        for name, (first, total) in ex["ttfb"].items():
            ready = ex["ready"].get(name)
            rest = ex["rest"].get(name)
            lines.append(f"| {conc} | {name} | {first:.2f} | {total:.2f} | "
                         f"{'-' if ready is None else f'{ready:.1f}'} | {'-' if rest is None else f'{rest:.0f}'} |")
    lines += ["", "Three gateways (an Envoy, concurrency 1, and a sidecar each) on one MongoDB, one key, loaded at once "
              f"({max(CONNECTIONS // 3, 1)} connections each):", "",
              "| body | req/s (all three) | single bridge req/s | errors | p50 ms | p99 ms | MongoDB ops/req "
              "| settled s after load |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in many:
        single = next((x["rps"] for x in results if (x["conc"], x["kind"], x["target"]) == (1, m["kind"], "bridge")),
                      float("nan"))
        ops = m["mongo_ops"]
        lines.append(f"| {m['kind']} | {m['rps']:.0f} | {single:.0f} | {m['errors']} | {m['p50']:.2f} | {m['p99']:.2f} "
                     f"| {'-' if ops is None else f'{ops:.3f}'} | {m['drain_s']:.1f} |")
    lines += render_sustained(held)
    if tenants:
        lines += render_keys(tenants)
    later = reports.get("later_ms")
    if "error" in reports:
        lines += ["", f"The operator's reads were not measured this run: {reports['error']}."]
    else:
        lines += ["", f"The operator's reads over {reports['rows']:,} audit rows (100 keys, 4 models, 30 days; "
              f"{mongo_name()}), median of 5: a usage report grouped by key, model and day "
              f"({reports['usage_groups']:,} rows) {reports['usage_ms']:.0f} ms; the audit log's first page of 100 "
              f"{reports['first_ms']:.0f} ms, its 21st {'-' if later is None else f'{later:.0f}'} ms."]
    lines += ["", f"`.wasm` size: {os.path.getsize(wasm) / 1e6:.1f} MB. Sidecar RSS at rest: "
              f"{extras[1]['rest']['sidecar']:.0f} MiB.", ""]
    if steps:
        lines[-1:-1] = [""] + render_steps(steps, results) + [""]
    lines.append(ratio_line(results, tenants))
    lines.append(sustained_line(held))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import signal
    # SIGTERM and Ctrl-C unwind through main's cleanup, so nothing is left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    main()
