"""softwatch: exact softmax statistics of LLM decoding, stored, exported and watched for drift."""


def __getattr__(name: str):
    # `softwatch.instrument` without importing torch for every `softwatch` command
    if name == "instrument":
        from .instrument import instrument

        # importing the submodule bound its name here to the module: the function replaces it
        globals()["instrument"] = instrument
        return instrument
    raise AttributeError(f"module 'softwatch' has no attribute {name!r}")
