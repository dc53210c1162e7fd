import importlib
import os
from collections.abc import Iterator

# Nothing may be fetched at test time: an unknown hub id must fail at once, not after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton statistics kernel is tested under Triton's interpreter; the variable
# must be set before the kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (converted once into the user's cache)."""
    from softwatch.models import load_model

    return load_model("SmolLM2-135M-Instruct", device="cpu")


@pytest.fixture(scope="session")
def tiny():
    from softwatch.models import tiny_model

    return tiny_model(seed=0, logit_scale=30.0)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session."""
    import ray

    importlib.import_module("softwatch.serve")  # its Serve settings, before the cluster starts

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


API_KEY = "test-key"


TINY_SERVICE = {"model": "tiny-random", "num_cpus": 0.5, "require_api_key": True, "max_batch": 16,
                "defaults": {"temperature": 0.7, "max_tokens": 8},
                "drift": {"interval_s": 2, "min_sequences": 20, "window": 20, "permutations": 999}}
SMOL_SERVICE = {"model": "SmolLM2-135M-Instruct", "num_cpus": 1, "require_api_key": True, "max_batch": 32,
                "torch_threads": 2}  # the real default model: the one vLLM runs


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    yield from serve_on(tmp_path_factory, **TINY_SERVICE)


def serve_on(tmp_path_factory, proxy_location: str | None = None, **args) -> Iterator[dict]:
    """Run the app with `args` (a data root and an API key file added) on a free port until the
    caller's module is done; yields its url, data root, args, port, engine, and the served model's
    id and context length (from the replica, so that tests derive their numbers from the model)."""
    from ray import serve

    from softwatch.serve.app import APP_NAME, run

    from .prometheus import free_port

    data = str(tmp_path_factory.mktemp(f"serve-{args.get('engine', 'auto')}-data"))
    key_file = tmp_path_factory.mktemp("secrets") / "api-key"
    key_file.write_text(API_KEY + "\n")
    port = free_port()
    args = {**args, "data": data, "api_key_file": str(key_file)}
    run(args, port=port, proxy_location=proxy_location)
    info = serve.get_deployment_handle("LLMServer", app_name=APP_NAME).info.remote().result()
    yield {"url": f"http://127.0.0.1:{port}", "data": data, "args": args, "port": port, "model": info["model_id"],
           "context_length": info["context_length"], "engine": args.get("engine", "auto")}
    serve.shutdown()  # the next module's service starts its own proxy on its own port


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server for the session, configured through the standard AWS variables."""
    from .s3 import S3Endpoint

    endpoint = S3Endpoint(tmp_path_factory.mktemp("moto"))
    with pytest.MonkeyPatch.context() as env:
        for name, value in endpoint.env.items():
            env.setenv(name, value)
        yield endpoint
    endpoint.stop()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch):
    """A dataset root: a local directory, or `s3://<fresh bucket>/data` on moto's server. The
    journal of an object-store root lives in the local cache: a per-test one here."""
    from .s3 import Root

    if request.param == "local":
        return Root(str(tmp_path / "data"))
    monkeypatch.setenv("SOFTWATCH_CACHE", str(tmp_path / "cache"))
    return request.getfixturevalue("s3_endpoint").new_root()
