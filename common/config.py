"""Server configuration: one frozen dataclass, read from GATEWAY_* env vars, overridable by flags.

A step that adds knobs subclasses ServerConfig with only its new fields; `load()` picks them up
from the environment (GATEWAY_MAX_BATCH_SIZE=8) and the command line (--max-batch-size 8).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "GATEWAY_"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

T = TypeVar("T", bound="ServerConfig")


def default_cache_dir() -> Path:
    return Path(os.environ.get(f"{ENV_PREFIX}CACHE_DIR", Path.home() / ".cache" / "llm-gateway"))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # A Hugging Face-format folder; empty means the converted SmolLM2 in the cache.
    model: str = ""
    served_model_name: str = DEFAULT_MODEL_NAME
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 | float16
    default_max_tokens: int = 256
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {self.dtype!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1")

    @property
    def model_path(self) -> Path:
        return Path(self.model) if self.model else default_cache_dir() / "smollm2-135m-instruct"

    @classmethod
    def load(cls: type[T], argv: list[str] | None = None, **overrides: Any) -> T:
        """Defaults, then GATEWAY_* env vars, then command-line flags, then keyword overrides."""
        values: dict[str, Any] = {}
        fields = dataclasses.fields(cls)
        for f in fields:
            raw = os.environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _coerce(raw, _field_type(f))
        parser = argparse.ArgumentParser(description=cls.__doc__)
        for f in fields:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None)
        args = parser.parse_args(argv if argv is not None else [])
        for name, raw in vars(args).items():
            if raw is not None:
                values[name] = _coerce(raw, _field_type(next(f for f in fields if f.name == name)))
        values.update(overrides)
        return cls(**values)


def _field_type(field: dataclasses.Field) -> type:
    # Annotations are strings under `from __future__ import annotations`.
    name = field.type if isinstance(field.type, str) else field.type.__name__
    return {"int": int, "float": float, "bool": bool}.get(name, str)


def _coerce(raw: str, kind: type) -> Any:
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return kind(raw)
