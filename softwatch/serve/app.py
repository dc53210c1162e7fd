"""The Serve application builder (`import_path: softwatch.serve.app:build_app` in a Serve
config) and the local runner behind `softwatch serve`."""

from __future__ import annotations

import os

from ray import serve
from ray.serve import Application

from .ingress import Ingress
from .llm import DEFAULT_KEYS, LLMServer
from .monitor import DriftMonitor

APP_NAME = "softwatch"

# Settings of the LLM replicas (the rest of `args` configures the deployments).
SETTINGS = ("model", "device", "dtype", "data", "metrics", "max_batch", "store_text", "token_sample_rate",
            "torch_threads", "deployment", "allow_fault_injection")


def build_app(args: dict) -> Application:
    """args: the SETTINGS above, plus `replicas`, `num_cpus`, `num_gpus`, `defaults` (the
    user_config: decoding defaults), `drift` (the DriftMonitor's user_config: interval_s and
    thresholds), `api_key` (default $SOFTWATCH_API_KEY) and `deployments`
    ({"LLMServer": {...Serve deployment options}, "Ingress": {...}, "DriftMonitor": {...}}).
    With a `data` root the app runs a DriftMonitor over it."""
    args = dict(args or {})
    unknown = set(args) - set(SETTINGS) - {"replicas", "num_cpus", "num_gpus", "defaults", "drift", "api_key",
                                           "deployments"}
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}")
    defaults = dict(args.get("defaults") or {})
    bad = set(defaults) - set(DEFAULT_KEYS)
    if bad:
        raise ValueError(f"unknown decoding defaults {sorted(bad)}; allowed: {', '.join(DEFAULT_KEYS)}")
    settings = {k: args[k] for k in SETTINGS if k in args}
    overrides = args.get("deployments") or {}
    llm_options = {
        "name": "LLMServer",
        "num_replicas": int(args.get("replicas", 1)),
        "max_ongoing_requests": 256,
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
            {"data": settings["data"], "metrics": settings.get("metrics", "none")})
    api_key = args.get("api_key", os.environ.get("SOFTWATCH_API_KEY"))
    return Ingress.options(**overrides.get("Ingress", {})).bind(llm, api_key, monitor)


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


def run(args: dict, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False):
    """Deploy on the connected Ray cluster with an HTTP proxy on host:port."""
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=blocking)
