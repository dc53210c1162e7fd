"""The Ray Serve application: an OpenAI-compatible ingress in front of instrumented LLM replicas."""

import os

# Serve gives its HTTP proxy 5 s to report ready, three times; on a loaded machine (CI's two
# cores, a benchmark beside the service) it can take longer, and Serve then kills the proxy
# and fails to start. Clusters started after this import inherit the longer limit.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
