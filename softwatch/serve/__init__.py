"""The Ray Serve application: an OpenAI-compatible ingress in front of instrumented LLM replicas."""
