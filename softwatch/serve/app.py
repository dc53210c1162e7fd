"""The Serve application builder (`import_path: softwatch.serve.app:build_app` in a Serve
config) and the local runner behind `softwatch serve`."""

from __future__ import annotations

import os
import time

from ray import serve
from ray.serve import Application

from ..vllm import ENGINES
from .ingress import Ingress
from .llm import DEFAULT_KEYS, LLMServer
from .monitor import DriftMonitor

APP_NAME = "softwatch"

# Settings of the LLM replicas (the rest of `args` configures the deployments).
SETTINGS = ("engine", "observe", "model", "device", "dtype", "data", "metrics", "max_batch", "store_text",
            "token_sample_rate", "torch_threads", "deployment", "allow_fault_injection", "max_prompt_tokens",
            "max_batch_tokens", "request_timeout_s", "max_failed_steps", "journal")
MAX_QUEUED_REQUESTS = 512  # per LLM replica; beyond it a request is answered 503 with Retry-After
RETRY_AFTER_S = 2.0


def build_app(args: dict) -> Application:
    """args: the SETTINGS above (`engine`: "auto" — vLLM with the softwatch observer where vLLM is
    installed, else softwatch's own engine — "vllm" or "softwatch"), plus `replicas`, `num_cpus`, `num_gpus`, `defaults` (the
    user_config: decoding defaults), `drift` (the DriftMonitor's user_config: interval_s and
    thresholds), `journal` (a directory every node mounts, for the replicas' write-ahead journal: see
    store.journal_dir), `require_api_key` (refuse to start without a key), `api_key_file` (a path on the
    ingress's node; else the key is $SOFTWATCH_API_KEY there: see serve/auth.py) and
    `deployments` ({"LLMServer": {...Serve deployment options}, "Ingress": {...}, "DriftMonitor": {...}}).
    With a `data` root the app runs a DriftMonitor over it."""
    args = dict(args or {})
    if "api_key" in args:
        raise ValueError("api_key must not be an application arg (anyone who reads the Serve config would see it): "
                         "set $SOFTWATCH_API_KEY where the replicas run, or api_key_file to a secret file")
    unknown = set(args) - set(SETTINGS) - {"replicas", "num_cpus", "num_gpus", "defaults", "drift", "deployments",
                                           "api_key_file", "require_api_key", "max_queued_requests"}
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}")
    defaults = dict(args.get("defaults") or {})
    bad = set(defaults) - set(DEFAULT_KEYS)
    if bad:
        raise ValueError(f"unknown decoding defaults {sorted(bad)}; allowed: {', '.join(DEFAULT_KEYS)}")
    settings = {k: args[k] for k in SETTINGS if k in args}
    if settings.get("engine", "auto") not in ENGINES:
        raise ValueError(f"engine: must be one of {', '.join(ENGINES)}, got {settings['engine']!r}")
    if settings.get("journal") is not None and not os.path.isabs(settings["journal"]):
        raise ValueError(f"journal: must be an absolute path, the same on every node (a shared volume), "
                         f"got {settings['journal']!r}")
    overrides = args.get("deployments") or {}
    llm_options = {
        "name": "LLMServer",
        "num_replicas": int(args.get("replicas", 1)),
        "max_ongoing_requests": 256,
        "max_queued_requests": int(args.get("max_queued_requests", MAX_QUEUED_REQUESTS)),
        "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
        "ray_actor_options": {"num_cpus": float(args.get("num_cpus", 1)), "num_gpus": float(args.get("num_gpus", 0))},
        "user_config": defaults,
        "graceful_shutdown_timeout_s": 30,
        **overrides.get("LLMServer", {}),
    }
    if "autoscaling_config" in llm_options:
        llm_options.pop("num_replicas")
    llm = serve.deployment(LLMServer).options(**llm_options).bind(settings)
    monitor = None
    if settings.get("data"):
        monitor_options = {"name": "DriftMonitor", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1},
                           "user_config": dict(args.get("drift") or {}), **overrides.get("DriftMonitor", {})}
        monitor = serve.deployment(DriftMonitor).options(**monitor_options).bind(
            {"data": settings["data"], "metrics": settings.get("metrics", "none")}, llm)
    return Ingress.options(**overrides.get("Ingress", {})).bind(
        llm, monitor, api_key_file=args.get("api_key_file"), require_api_key=bool(args.get("require_api_key", False)))


def args_from_config(path: str) -> tuple[dict, dict]:
    """(application args, http_options) of the first application of a Serve config file,
    with its `deployments` list folded into args["deployments"]."""
    import yaml

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    apps = config.get("applications") or []
    if not apps:
        raise ValueError(f"{path}: no applications")
    app = apps[0]
    args = dict(app.get("args") or {})
    deployments = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments") or []}
    if deployments:
        args["deployments"] = deployments
    return args, dict(config.get("http_options") or {})


def run(args: dict, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False, timeout_s: float = 600,
        proxy_location: str | None = None):
    """Deploy on the connected Ray cluster with an HTTP proxy on host:port, the way
    `serve deploy` does (a declarative config naming `build_app`), so that running it again
    with other `defaults` or `drift` settings is a lightweight `user_config` update: the
    replicas are reconfigured in place, not restarted. `proxy_location`: Serve's (None: its
    default, a proxy on every node)."""
    deploy([application(args)], host, port, timeout_s, proxy_location)
    if blocking:
        while True:
            time.sleep(1)


def application(args: dict, name: str = APP_NAME, route_prefix: str = "/") -> dict:
    """The Serve config entry of one softwatch app; bad args are refused here, with the message,
    before the controller sees them."""
    build_app(args)
    app_args = {k: v for k, v in args.items() if k not in ("defaults", "drift", "deployments")}
    overrides = dict(args.get("deployments") or {})
    llm, monitor = overrides.pop("LLMServer", {}), overrides.pop("DriftMonitor", {})
    deployments = [{**llm, "name": "LLMServer", "user_config": dict(args.get("defaults") or llm.get("user_config") or {})}]
    if args.get("data"):
        deployments.append({**monitor, "name": "DriftMonitor",
                            "user_config": dict(args.get("drift") or monitor.get("user_config") or {})})
    deployments += [{**options, "name": name} for name, options in overrides.items()]
    return {"name": name, "route_prefix": route_prefix, "import_path": f"{__name__}:build_app",
            "args": app_args, "deployments": deployments}


def deploy(applications: list[dict], host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 600,
           proxy_location: str | None = None) -> None:
    """Make `applications` (entries from `application`) the cluster's whole set of Serve apps
    (a declarative deploy: apps not named are removed) and wait until every one runs."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    serve.start(http_options={"host": host, "port": port}, proxy_location=proxy_location)
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": applications}))
    for app in applications:
        _wait_until_running(app["name"], timeout_s)


def _wait_until_running(name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        status = str(getattr(app, "status", "")) if app else ""
        if status.endswith("RUNNING"):
            return
        if status.endswith("DEPLOY_FAILED") or time.monotonic() > deadline:
            message = getattr(app, "message", "") if app else "the application never appeared"
            raise RuntimeError(f"the {name} app did not start ({status or 'no status'}): {message}")
        time.sleep(0.5)
