#!/usr/bin/env python3
"""Render the gateway's Envoy bootstrap (JSON) from the seed's settings.

    python3 envoy/render.py > envoy.json        # reads the environment
    envoy -c envoy.json --concurrency 2

Every setting is an environment variable (see the README's settings table).
The upstream key ends up in the rendered file, inside the filter's plugin
configuration, and nowhere else: keep the file private (it is written 0600
when an output path is given). Standard library only.
"""

import json
import os
import sys
from urllib.parse import urlsplit

FILTER_NAME = "openclaw_bridge"
# How Envoy names what it serves to the sidecar's GET /v1/models (sidecar/src/own.rs).
SERVED_MODELS_HEADER = "x-bridge-served-models"
ROUTE_HEADER = "x-openclaw-bridge-route"
# The filter's default cluster_header: the admitted request's model's cluster.
CLUSTER_HEADER = "x-openclaw-bridge-cluster"


class SettingError(Exception):
    pass


def env(name, default=None, required=False):
    value = os.environ.get(name, "").strip()
    if not value:
        if required:
            raise SettingError(f"{name} is required")
        return default
    return value


def env_int(name, default=None, minimum=0):
    raw = env(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingError(f"{name} must be a whole number, not {raw!r}")
    if value < minimum:
        raise SettingError(f"{name} must be >= {minimum}")
    return value


def env_choice(name, choices):
    value = env(name)
    if value is not None and value not in choices:
        raise SettingError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


# The filter's settings that an environment variable may set: (variable,
# field, minimum). What is not set is left out of the plugin configuration, so
# the filter's own defaults (filter/src/config.rs) are the only ones; a test
# renders with an empty environment and checks they parse to exactly those.
PLUGIN_INTS = [
    ("SIDECAR_TIMEOUT_MS", "sidecar_timeout_ms", 1),
    ("RETRY_AFTER_SECS", "retry_after_secs", 1),
    ("MAX_BODY_BYTES", "max_body_bytes", 1),
    ("UNADMITTED_BYTES_MAX", "unadmitted_bytes_max", 1),
    ("DEFAULT_OUTPUT_RESERVATION", "default_output_reservation", 1),
    ("SETTLE_INTERVAL_MS", "settle_interval_ms", 1),
    ("SETTLE_BACKLOG_MAX", "settle_backlog_max", 1),
    ("SETTLE_BACKLOG_AGE_MS", "settle_backlog_age_ms", 1),
    ("LEASE_TOKENS", "lease_tokens", 0),
    ("LEASE_MS", "lease_ms", 10),
    ("LEASE_IDLE_MS", "lease_idle_ms", 10),
    ("LEASE_SLOTS", "lease_slots", 1),
    ("LEASE_WAIT_MS", "lease_wait_ms", 1),
    ("LEASE_WAITERS_MAX", "lease_waiters_max", 1),
    ("ADMISSION_CALLS_MAX", "admission_calls_max", 1),
]
# The filter's default api_version, which the bare (no filter) benchmark route writes itself.
FILTER_API_VERSION = "2024-12-01-preview"
# The filter's default of max_body_bytes, which Envoy's buffer must also fit.
FILTER_MAX_BODY_BYTES = 8 * 1024 * 1024


def host_port(name, default):
    raw = env(name, default)
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SettingError(f"{name} must look like HOST:PORT, not {raw!r}")
    return host, int(port)


def socket_address(host, port):
    return {"socket_address": {"address": host, "port_value": port}}


def is_ip(host):
    parts = host.split(".")
    return (len(parts) == 4 and all(p.isdigit() for p in parts)) or ":" in host


def cluster(name, host, port, tls_sni=None, timeout="2s"):
    c = {
        "name": name,
        "type": "STATIC" if is_ip(host) else "LOGICAL_DNS",
        "connect_timeout": timeout,
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(host, port)}}]}],
        },
        # A gateway multiplexes many agents onto one upstream: Envoy's default
        # limit of 1024 pending requests would turn bursts into 503s.
        "circuit_breakers": {"thresholds": [{
            "max_connections": 100000, "max_pending_requests": 100000,
            "max_requests": 100000, "max_retries": 3}]},
    }
    if tls_sni:
        c["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": tls_sni,
                "common_tls_context": {"validation_context": {
                    "trusted_ca": {"filename": env("ENVOY_CA_FILE", "/etc/ssl/certs/ca-certificates.crt")},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": tls_sni}}],
                }},
            },
        }
    return c


# The keys of a model in MODELS_FILE, and of its upstream.
MODEL_KEYS = {"name", "upstream", "upstreams", "endpoints", "encoding", "default_output_tokens",
              "max_output_tokens", "reasoning", "prices", "service_tiers"}
PRICE_KEYS = {"input", "cached_input", "output"}
UPSTREAM_KEYS = {"style", "base_url", "deployment", "model", "api_key_env", "api_version"}
STYLES = ("azure", "azure_v1", "openai")
ENDPOINTS = ("chat", "responses", "embeddings")


def model_upstream(at, up):
    """One upstream of a model, checked: (style, url, port, key, fields for the filter)."""
    if not isinstance(up, dict):
        raise SettingError(f"{at} needs an \"upstream\" object (or \"upstreams\", a list of them)")
    unknown = set(up) - UPSTREAM_KEYS
    if unknown:
        raise SettingError(f"{at} upstream: unknown keys {sorted(unknown)}")
    style = up.get("style", "azure")
    if style not in STYLES:
        raise SettingError(f"{at} upstream.style must be one of {', '.join(STYLES)}")
    url = urlsplit(str(up.get("base_url", "")))
    if url.scheme not in ("http", "https") or not url.hostname:
        raise SettingError(f"{at} upstream.base_url must be an http(s) URL")
    if url.path.rstrip("/") not in ("", "/v1" if style == "openai" else ""):
        raise SettingError(f"{at} upstream.base_url may have no path (or /v1 for openai)")
    key_env = up.get("api_key_env")
    if not isinstance(key_env, str) or not key_env:
        raise SettingError(f"{at} upstream.api_key_env must name the variable that holds its key")
    key = env(key_env)
    if key is None:
        raise SettingError(f"{at}: {key_env} (its key) is not set")
    port = url.port or (443 if url.scheme == "https" else 80)
    fields = {dst: up[src] for src, dst in [("deployment", "deployment"), ("model", "upstream_model"),
                                             ("api_version", "api_version")] if src in up}
    return style, url, port, key, fields


# The endpoint metadata that carries a pool member's key (cluster `model_N`'s
# upstream filter writes it into each attempt's request).
POOL_KEY = ["openclaw_bridge", "key"]


def pool_cluster(name, style, members):
    """One cluster for the deployments of a pool: an endpoint each, with its
    key in its metadata; an upstream filter writes the chosen endpoint's key
    into every attempt (so a retry on another deployment carries that one's
    key) and the route rewrites the host to the endpoint's."""
    hosts = [url.hostname for _, url, _, _, _ in members]
    tls = {url.scheme for _, url, _, _, _ in members}
    if len(tls) > 1:
        raise SettingError(f"the deployments of model cluster {name} mix http and https")
    key_value = "%UPSTREAM_METADATA([\"" + POOL_KEY[0] + "\", \"" + POOL_KEY[1] + "\"])%"
    header = ("api-key", key_value) if style != "openai" else ("authorization", "Bearer " + key_value)
    c = {
        "name": name,
        "type": "STATIC" if all(is_ip(h) for h in hosts) else "STRICT_DNS",
        "connect_timeout": "2s",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": socket_address(url.hostname, port), "hostname": url.hostname},
             "metadata": {"filter_metadata": {POOL_KEY[0]: {POOL_KEY[1]: key}}}}
            for _, url, port, key, _ in members]}]},
        "circuit_breakers": {"thresholds": [{
            "max_connections": 100000, "max_pending_requests": 100000,
            "max_requests": 100000, "max_retries": 100000}]},
        # A deployment that keeps failing is taken out for a while.
        "outlier_detection": {"consecutive_5xx": 5, "interval": "10s", "base_ejection_time": "30s",
                              "max_ejection_percent": 50},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http_protocol_options": {}},
            "upstream_http_protocol_options": {"auto_sni": True, "auto_san_validation": True},
            "http_filters": [
                {"name": "envoy.filters.http.header_mutation", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                    "mutations": {"request_mutations": [{"append": {
                        "header": {"key": header[0], "value": header[1]},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}]}}},
                {"name": "envoy.filters.http.upstream_codec", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}},
            ]}},
    }
    if tls == {"https"}:
        c["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"validation_context": {
                    "trusted_ca": {"filename": env("ENVOY_CA_FILE", "/etc/ssl/certs/ca-certificates.crt")}}},
            },
        }
    return c


def catalog():
    """The models of MODELS_FILE (JSON; see the README), each with the Envoy
    cluster of its upstream (one, or a pool of deployments): [(model entry of
    the plugin configuration, cluster)], or None when MODELS_FILE is not set.
    The keys come from the environment variables the file names; the file
    holds no secret."""
    path = env("MODELS_FILE")
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise SettingError(f"MODELS_FILE {path!r}: {e}")
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, list) or not models:
        raise SettingError("MODELS_FILE must hold {\"models\": [...]} with at least one model")
    out, names = [], set()
    for i, m in enumerate(models):
        at = f"MODELS_FILE models[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
            raise SettingError(f"{at} needs a \"name\"")
        at = f"MODELS_FILE model {m['name']!r}"
        if m["name"] in names:
            raise SettingError(f"{at} is listed twice")
        names.add(m["name"])
        unknown = set(m) - MODEL_KEYS
        if unknown:
            raise SettingError(f"{at}: unknown keys {sorted(unknown)}")
        if ("upstream" in m) == ("upstreams" in m):
            raise SettingError(f"{at} needs \"upstream\" (one) or \"upstreams\" (a pool), not both")
        ups = m["upstreams"] if "upstreams" in m else [m["upstream"]]
        if not isinstance(ups, list) or not ups:
            raise SettingError(f"{at} upstreams must be a non-empty list")
        members = [model_upstream(at, up) for up in ups]
        style, url, port, key, fields = members[0]
        if any((st, f) != (style, fields) for st, _, _, _, f in members):
            raise SettingError(f"{at}: the deployments of a pool must share style, deployment, model and "
                               "api_version (they differ by base_url and key)")
        default_port = port == (443 if url.scheme == "https" else 80)
        entry = {"name": m["name"], "cluster": f"model_{i}", "upstream": style, "upstream_key": key, **fields}
        if len(members) == 1:
            entry["authority"] = url.hostname if default_port else f"{url.hostname}:{port}"
        if "endpoints" in m:
            if not isinstance(m["endpoints"], list) or not set(m["endpoints"]) <= set(ENDPOINTS):
                raise SettingError(f"{at} endpoints must be a list of {', '.join(ENDPOINTS)}")
            entry["endpoints"] = m["endpoints"]
        for src, dst in [("encoding", "tiktoken_encoding"), ("default_output_tokens", "default_output_reservation"),
                         ("max_output_tokens", "max_output_reservation"), ("reasoning", "reasoning")]:
            if src in m:
                entry[dst] = m[src]
        if "prices" in m:
            prices = m["prices"]
            if (not isinstance(prices, dict) or not set(prices) <= PRICE_KEYS
                    or not all(isinstance(w, (int, float)) and 0 <= w <= 1000 for w in prices.values())):
                raise SettingError(f"{at} prices must map {', '.join(sorted(PRICE_KEYS))} to weights 0 to 1000")
            entry["prices"] = prices
        if "service_tiers" in m:
            tiers = m["service_tiers"]
            if (not isinstance(tiers, dict) or not all(isinstance(t, str) and t not in ("auto", "default") for t in tiers)
                    or not all(isinstance(w, (int, float)) and 0 < w <= 1000 for w in tiers.values())):
                raise SettingError(f"{at} service_tiers must map tier names (not auto or default) to multipliers above 0, at most 1000")
            entry["service_tiers"] = tiers
        if len(members) == 1:
            tls = url.hostname if url.scheme == "https" else None
            out.append((entry, cluster(f"model_{i}", url.hostname, port, tls_sni=tls), False))
        else:
            out.append((entry, pool_cluster(f"model_{i}", style, members), True))
    return out


def plugin_configuration(models=None):
    """The filter's configuration: what is required, and what the environment
    sets; with a catalog (MODELS_FILE) its models instead of the LLM_* model."""
    provider = env_choice("LLM_PROVIDER", ("azure", "openai"))
    if models is not None:
        cfg = {"sidecar_cluster": "sidecar", "route_header": ROUTE_HEADER, "models": [e for e, _, _ in models]}
    else:
        cfg = {
            "sidecar_cluster": "sidecar",
            # The seed's default model: the Azure deployment, or the model sent to an OpenAI upstream.
            "model": env("LLM_MODEL", "gpt-5-nano"),
            "upstream_key": env("LLM_API_KEY", required=True),
            "route_header": ROUTE_HEADER,
        }
        if provider:
            cfg["upstream"] = provider
    if models is None and provider in (None, "azure"):
        cfg["deployment"] = cfg["model"]
        version = env("LLM_API_VERSION")
        if version:
            cfg["api_version"] = version
    for name, field, choices in [
        ("FAILURE_MODE", "failure_mode", ("deny", "allow")),
        ("TIKTOKEN_ENCODING", "tiktoken_encoding", ("cl100k_base", "o200k_base")),
    ]:
        value = env_choice(name, choices)
        if value:
            cfg[field] = value
    for name, field, minimum in PLUGIN_INTS:
        value = env_int(name, None, minimum)
        if value is not None:
            cfg[field] = value
    for name, field in [("CAP_OUTPUT", "cap_output"), ("LLM_REASONING", "reasoning")]:
        value = env_choice(name, ("1", "0"))
        if value:
            cfg[field] = value == "1"
    token = env("INTERNAL_TOKEN")
    if token:
        cfg["internal_token"] = token
    return cfg


def render():
    bare = env("BRIDGE_FILTER", "1") == "0"
    models = None if bare else catalog()
    if models is None:
        endpoint = env("LLM_ENDPOINT", required=True)
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise SettingError(f"LLM_ENDPOINT must be an http(s) URL, not {endpoint!r}")
        upstream_host = url.hostname
        upstream_port = url.port or (443 if url.scheme == "https" else 80)
    sidecar_host, sidecar_port = host_port("SIDECAR_ADDR", "127.0.0.1:8001")
    if sidecar_host == "0.0.0.0":
        sidecar_host = "127.0.0.1"
    listen_host = env("GATEWAY_HOST", "0.0.0.0")
    listen_port = env_int("GATEWAY_PORT", 8000)
    admin_port = env_int("ENVOY_ADMIN_PORT", 9901)
    wasm = os.path.abspath(env("WASM_PATH", os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "target", "wasm32-wasip1", "release",
        "openclaw_filter.wasm")))
    max_body = env_int("MAX_BODY_BYTES", FILTER_MAX_BODY_BYTES, 1)
    idle = f'{env_int("STREAM_IDLE_TIMEOUT_SECS", 300, 1)}s'
    # BRIDGE_FILTER=0 renders the same listener and routes without the filter,
    # with Envoy itself adding the upstream key and path: the "bare Envoy" the
    # benchmark compares against. Never for production: nothing is billed.
    disabled = {} if bare else {
        FILTER_NAME: {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}}
    marker = [{"name": ROUTE_HEADER, "string_match": {"exact": "upstream"}}]
    get_only = [{"name": ":method", "string_match": {"exact": "GET"}}]
    served_models = (",".join(e["name"] for e, _, _ in models) if models is not None
                     else env("LLM_MODEL", "gpt-5-nano"))
    upstream_route = {
        # The filter names the model's cluster on the requests it admitted.
        "cluster_header": CLUSTER_HEADER,
        # Long generations must not be cut: no overall timeout, an idle one instead.
        "timeout": "0s",
        "idle_timeout": idle,
    }
    if models is None:
        upstream_route["host_rewrite_literal"] = (upstream_host if url.port is None
                                                  else f"{upstream_host}:{upstream_port}")
    not_found = json.dumps({"error": {"message": "Unknown request URL.", "type": "invalid_request_error",
                                      "param": None, "code": "unknown_url"}})
    if bare:
        plugin = plugin_configuration()
        # What is unset takes the filter's defaults (filter/src/config.rs).
        upstream = plugin.get("upstream", "azure")
        auth = ("api-key", plugin["upstream_key"]) if upstream == "azure" else (
            "authorization", "Bearer " + plugin["upstream_key"])
        bare_route = dict(upstream_route)
        del bare_route["cluster_header"]
        bare_route["cluster"] = "llm_upstream"
        if upstream == "azure":
            version = plugin.get("api_version", FILTER_API_VERSION)
            bare_route["prefix_rewrite"] = (f'/openai/deployments/{plugin["deployment"]}/chat/completions'
                                            f'?api-version={version}')
        upstream_routes = [{
            "match": {"path": "/v1/chat/completions"}, "route": bare_route,
            "request_headers_to_add": [{"header": {"key": auth[0], "value": auth[1]},
                                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        }]
    else:
        # A pool's requests fail over between its deployments: on a refused
        # connection, a reset, a 5xx or a 429, Envoy tries another (each
        # attempt with that deployment's key and host). Only the answer the
        # client gets is metered, so a request is billed once.
        pool_routes = []
        for entry, c, pooled in models or []:
            if not pooled:
                continue
            members = len(c["load_assignment"]["endpoints"][0]["lb_endpoints"])
            route = {k: v for k, v in upstream_route.items() if k != "cluster_header"}
            route.update({
                "cluster": entry["cluster"],
                "auto_host_rewrite": True,
                "retry_policy": {
                    "retry_on": "connect-failure,refused-stream,reset,5xx,retriable-status-codes",
                    "retriable_status_codes": [429],
                    "num_retries": members - 1,
                    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
                    "host_selection_retry_max_attempts": 5,
                },
            })
            mine = marker + [{"name": CLUSTER_HEADER, "string_match": {"exact": entry["cluster"]}}]
            pool_routes += [{"match": {"prefix": prefix, "headers": mine}, "route": route,
                             "request_headers_to_remove": [ROUTE_HEADER, CLUSTER_HEADER]}
                            for prefix in ("/openai/", "/v1/")]
        upstream_routes = [
            *pool_routes,
            # Only requests the filter admitted carry the marker; it never leaves Envoy.
            {"match": {"prefix": "/openai/", "headers": marker}, "route": upstream_route,
             "request_headers_to_remove": [ROUTE_HEADER, CLUSTER_HEADER]},
            {"match": {"prefix": "/v1/", "headers": marker}, "route": upstream_route,
             "request_headers_to_remove": [ROUTE_HEADER, CLUSTER_HEADER]},
        ]
    routes = [
        {"match": {"path": "/healthz"},
         "direct_response": {"status": 200, "body": {"inline_string": "{\"status\":\"ok\"}"}},
         "typed_per_filter_config": disabled},
        {"match": {"prefix": "/admin/"}, "route": {"cluster": "sidecar", "timeout": "30s"},
         "typed_per_filter_config": disabled},
        # A key's own view: the sidecar checks the user's key itself.
        {"match": {"path": "/v1/key", "headers": get_only},
         "route": {"cluster": "sidecar", "timeout": "10s"}, "typed_per_filter_config": disabled},
        # The models a key may use: the sidecar knows the key's allowed_models,
        # Envoy tells it what is served (a client's header of that name is replaced).
        *({"match": {match: path, "headers": get_only},
           "route": {"cluster": "sidecar", "timeout": "10s"}, "typed_per_filter_config": disabled,
           "request_headers_to_add": [{"header": {"key": SERVED_MODELS_HEADER, "value": served_models},
                                       "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}
          for match, path in (("path", "/v1/models"), ("prefix", "/v1/models/"))),
        *upstream_routes,
        {"match": {"prefix": "/"},
         "direct_response": {"status": 404, "body": {"inline_string": not_found}},
         "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}]},
    ]
    wasm_filter = {
        "name": FILTER_NAME,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": FILTER_NAME,
                "root_id": FILTER_NAME,
                "vm_config": {
                    "vm_id": FILTER_NAME,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": json.dumps(plugin_configuration(models)),
                },
                # A trapped VM is replaced after a short 503 window; FAIL_OPEN would
                # let unbilled requests through, FAIL_CLOSED would 503 forever.
                "failure_policy": "FAIL_RELOAD",
                # Without this a pause in the headers phase stops body callbacks.
                "allow_on_headers_stop_iteration": True,
            },
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gateway",
        "normalize_path": True,
        "merge_slashes": True,
        "use_remote_address": True,
        "stream_idle_timeout": idle,
        "request_timeout": "0s",
        "route_config": {"name": "gateway", "virtual_hosts": [
            {"name": "gateway", "domains": ["*"], "routes": routes}]},
        "http_filters": ([] if bare else [wasm_filter]) + [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    if env("ACCESS_LOG", "1") != "0":
        # No headers in the access log: they carry keys. Nor the rest of an
        # /admin/ path: `PATCH /admin/keys/{api_key}` names a key in the URL,
        # so those lines print the path cut after "/admin/keys/".
        def access_log(path, admin):
            return {
                "name": "envoy.access_loggers.stdout",
                "filter": {"header_filter": {"header": {
                    "name": ":path", "string_match": {"prefix": "/admin/"}, "invert_match": not admin}}},
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    "log_format": {"text_format_source": {"inline_string":
                        f"[%START_TIME%] \"%REQ(:METHOD)% {path} %PROTOCOL%\" "
                        "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%ms "
                        "bridge_id=%RESP(X-BRIDGE-REQUEST-ID)%\n"}}}}
        hcm["access_log"] = [
            access_log("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", admin=False),
            access_log("%REQ(:PATH):12%...", admin=True),
        ]
    if models is None:
        tls = upstream_host if url.scheme == "https" else None
        upstream_clusters = [cluster("llm_upstream", upstream_host, upstream_port, tls_sni=tls)]
    else:
        upstream_clusters = [c for _, c, _ in models]
    return {
        "admin": {"address": socket_address("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": [{
                "name": "gateway",
                "address": socket_address(listen_host, listen_port),
                # Bodies up to MAX_BODY_BYTES must fit Envoy's buffer, else Envoy answers 413 itself.
                "per_connection_buffer_limit_bytes": max_body + 1024 * 1024,
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
            }],
            "clusters": [
                cluster("sidecar", sidecar_host, sidecar_port, timeout="1s"),
                *upstream_clusters,
            ],
        },
    }


def main():
    try:
        text = json.dumps(render(), indent=2)
    except SettingError as e:
        print(f"envoy/render.py: {e}", file=sys.stderr)
        return 2
    if len(sys.argv) > 1:
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
