"""Server configuration: frozen dataclasses, read from GATEWAY_* env vars, overridable by flags.

Every setting is declared once, with its default and its help text, by `knob()`. A component that
has settings declares them in a `ConfigPart` next to its code (step 2's queue, step 6's admission,
step 7's engine, ...); a step's `Config` is `ServerConfig` plus the parts it uses, so it holds
only the knobs that step reads, and components take the config rather than a row of numbers.

`Config.load()` reads the environment (GATEWAY_MAX_BATCH_SIZE=8), then the command line
(--max-batch-size 8); `python -m stepN_name --help` lists every knob with its help and default.
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

T = TypeVar("T", bound="ConfigPart")


def knob(default: Any, help: str) -> Any:
    """A setting: its default, and the sentence `--help` shows for it."""
    return dataclasses.field(default=default, metadata={"help": help})


def default_cache_dir() -> Path:
    return Path(os.environ.get(f"{ENV_PREFIX}CACHE_DIR", Path.home() / ".cache" / "llm-gateway"))


@dataclass(frozen=True)
class ConfigPart:
    """A group of settings. Subclasses add fields with `knob()` and check them in
    `__post_init__`, calling `super().__post_init__()` so every part of a combined config is
    checked."""

    def __post_init__(self) -> None:
        pass

    @classmethod
    def load(
        cls: type[T], argv: list[str] | None = None, prog: str | None = None, **overrides: Any
    ) -> T:
        """Defaults, then GATEWAY_* env vars, then command-line flags, then keyword overrides."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, f in fields.items():
            raw = os.environ.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = _coerce(raw, _field_type(f), ENV_PREFIX + name.upper())
        args = cls.argument_parser(prog).parse_args(argv if argv is not None else [])
        for name, raw in vars(args).items():
            if raw is not None:
                values[name] = _coerce(raw, _field_type(fields[name]), _flag(name))
        values.update(overrides)
        return cls(**values)

    @classmethod
    def argument_parser(cls, prog: str | None = None) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=prog,
            description=(cls.__doc__ or "").strip(),
            epilog=f"Every flag is also an env var: --max-tokens-limit is {ENV_PREFIX}"
            "MAX_TOKENS_LIMIT. Flags win over env vars.",
        )
        for f in dataclasses.fields(cls):
            kind = _field_type(f)
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                default=None,
                metavar=kind.__name__.upper(),
                help=f"{f.metadata.get('help', '')} (default: {f.default!r})",
            )
        return parser


@dataclass(frozen=True)
class ServerConfig(ConfigPart):
    """Settings every step has: where to listen, which model, on what device."""

    host: str = knob("127.0.0.1", "address to listen on")
    port: int = knob(8000, "port to listen on")
    model: str = knob("", "a Hugging Face-format model folder; empty: the converted SmolLM2")
    served_model_name: str = knob(DEFAULT_MODEL_NAME, "the name clients send as `model`")
    device: str = knob("auto", "auto | cpu | cuda (auto: cuda when present)")
    dtype: str = knob("float32", "float32 | bfloat16 | float16")
    default_max_tokens: int = knob(256, "max_tokens of a request that gives none")
    log_level: str = knob("info", "debug | info | warning | error")

    def __post_init__(self) -> None:
        super().__post_init__()
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


def _field_type(field: dataclasses.Field) -> type:
    # Annotations are strings under `from __future__ import annotations`.
    name = field.type if isinstance(field.type, str) else field.type.__name__
    return {"int": int, "float": float, "bool": bool}.get(name, str)


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(raw: str, kind: type, source: str) -> Any:
    """The raw text as the field's type; a word that is neither is an error naming its source,
    so a guess like `--response-cache redis` stops the start instead of meaning false."""
    if kind is bool:
        word = raw.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(
            f"{source}: {raw!r} is not a boolean; use one of {', '.join(TRUE_WORDS)} "
            f"or {', '.join(FALSE_WORDS)}"
        )
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{source}: {raw!r} is not a valid {kind.__name__}") from None
