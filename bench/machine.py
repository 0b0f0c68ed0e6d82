"""The machine class: which runs' absolute numbers may be compared.

Two runs compare only when the CPU that made them decodes alike: the same vendor and core
generation, the same vector instructions (an AVX-512 build of step 7's kernels is another program
than its AVX2 build) and the same number of cores the bench may use. /proc/cpuinfo says all of
that; the class names it in one short string, for example `amd-zen5-avx512-2c`:

    <vendor>-<generation>-<ISA tier>-<cores>c

- generation: from the CPU family and model numbers (AMD family 0x17 Zen/Zen 2, 0x19 Zen 3/Zen 4,
  0x1a Zen 5; a few Intel server models by name), else `f<family>m<model>`;
- ISA tier: `amx` (AMX tiles), `avx512` (AVX-512 F), `avx2`, else `base`, from the flags the
  CPU reports (a hypervisor may hide some, so the tier is read, not looked up from the
  generation). Which AVX-512 parts (BF16, VNNI) it has is recorded beside the class in `isa`;
  within one generation they come together (Zen 4 and Zen 5 have both);
- cores: the CPUs this process may run on (its affinity), which a container may cap below the
  machine's count.

The measured read bandwidth is recorded beside the class, not in it: it moves from run to run
(two published runs of one commit recorded 35.8 and 38.3 GB/s) and falls far lower while other
processes use the cores, so a class that contained it would split one machine into several.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

UNKNOWN = "unknown"
# The flags that change the numbers: which kernels torch, oneDNN and step 7's C++ pick.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
VENDORS = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}

# AMD: (family, first model, last model) -> generation, from AMD's published family/model lists.
AMD_GENERATIONS = (
    (0x17, 0x00, 0x2F, "zen"),  # Naples, Zen+ parts
    (0x17, 0x30, 0xFF, "zen2"),  # Rome (0x31), Matisse, Renoir
    (0x19, 0x00, 0x0F, "zen3"),  # Milan (0x01)
    (0x19, 0x10, 0x1F, "zen4"),  # Genoa (0x11)
    (0x19, 0x20, 0x5F, "zen3"),  # Vermeer, Cezanne
    (0x19, 0x60, 0x7F, "zen4"),  # Raphael, Phoenix
    (0x19, 0xA0, 0xAF, "zen4"),  # Bergamo, Siena
    (0x1A, 0x00, 0xFF, "zen5"),  # Turin (0x02, 0x11), Granite Ridge, Strix
)
# Intel family 6 server models.
INTEL_GENERATIONS = {
    0x3F: "haswell",
    0x4F: "broadwell",
    0x55: "skylake",  # Skylake-SP and Cascade Lake share the model number
    0x6A: "icelake",
    0x6C: "icelake",
    0x8F: "sapphirerapids",
    0xCF: "emeraldrapids",
    0xAD: "graniterapids",
    0xAE: "graniterapids",
}


@dataclass(frozen=True)
class Cpu:
    """What /proc/cpuinfo says about the first CPU (they are all alike on the machines here)."""

    vendor: str  # amd | intel | the raw vendor_id | unknown
    family: int | None
    model: int | None
    model_name: str
    isa: tuple[str, ...]  # those of ISA_FLAGS the CPU has, in ISA_FLAGS' order

    @property
    def generation(self) -> str:
        if self.family is None or self.model is None:
            return UNKNOWN
        if self.vendor == "amd":
            for family, first, last, name in AMD_GENERATIONS:
                if family == self.family and first <= self.model <= last:
                    return name
        if self.vendor == "intel" and self.family == 6 and self.model in INTEL_GENERATIONS:
            return INTEL_GENERATIONS[self.model]
        return f"f{self.family}m{self.model}"

    @property
    def isa_tier(self) -> str:
        for flag, tier in (("amx_tile", "amx"), ("avx512f", "avx512"), ("avx2", "avx2")):
            if flag in self.isa:
                return tier
        return "base"


def parse_cpuinfo(text: str) -> Cpu:
    """The first processor block of a /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the end of the first processor's block
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    vendor_id = fields.get("vendor_id", "")
    return Cpu(
        vendor=VENDORS.get(vendor_id, vendor_id.lower() or UNKNOWN),
        family=_int(fields.get("cpu family")),
        model=_int(fields.get("model")),
        model_name=fields.get("model name", UNKNOWN),
        isa=tuple(flag for flag in ISA_FLAGS if flag in flags),
    )


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def machine_class(cpu: Cpu, cores: int | None) -> str:
    """`amd-zen5-avx512-2c`; `unknown` when the CPU's vendor or numbers could not be read."""
    if cpu.vendor == UNKNOWN or cpu.generation == UNKNOWN or not cores:
        return UNKNOWN
    return f"{cpu.vendor}-{cpu.generation}-{cpu.isa_tier}-{cores}c"


def this_machine() -> str:
    """The class of the machine this process runs on."""
    return machine_class(read_cpu(), usable_cores())


def usable_cores() -> int | None:
    """The CPUs this process may run on: its affinity where the OS has one, else the count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def read_cpu(path: Path = Path("/proc/cpuinfo")) -> Cpu:
    try:
        return parse_cpuinfo(path.read_text())
    except OSError:  # not Linux: nothing to classify by
        return Cpu(UNKNOWN, None, None, UNKNOWN, ())
