"""bench/machine.py: the machine class read from /proc/cpuinfo texts of the CPUs the bench ran on
(an AVX2-only EPYC, a Zen 4 and a Zen 5 EPYC), and the class in what the bench writes."""

from __future__ import annotations

import pytest

from bench import history, machine, report

# The first processor block as Linux prints it; flags cut to the ones around the ISA flags.
COMMON_FLAGS = "fpu vme sse sse2 ssse3 sse4_1 sse4_2 fma avx f16c bmi1 bmi2"
AVX512 = "avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni avx512_vbmi2"
MILAN = f"""processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: {COMMON_FLAGS} avx2 vaes

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
"""
GENOA = f"""processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
flags\t\t: {COMMON_FLAGS} avx2 {AVX512}
"""
TURIN = f"""processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: {COMMON_FLAGS} avx2 {AVX512} avx_vnni
"""
SAPPHIRE_RAPIDS = f"""processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: {COMMON_FLAGS} avx2 {AVX512} amx_bf16 amx_tile amx_int8
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MILAN, "amd-zen3-avx2-2c"),
        (GENOA, "amd-zen4-avx512-2c"),
        (TURIN, "amd-zen5-avx512-2c"),
        (SAPPHIRE_RAPIDS, "intel-sapphirerapids-amx-2c"),
    ],
)
def test_the_class_names_vendor_generation_isa_and_cores(text, expected):
    assert machine.machine_class(machine.parse_cpuinfo(text), cores=2) == expected


def test_the_same_model_name_on_avx2_and_avx512_gives_two_classes():
    """The CPUs all say "AMD EPYC": the model name alone mixed these runs."""
    avx2_epyc = MILAN.replace("AMD EPYC 7B13", "AMD EPYC")
    classes = {machine.machine_class(machine.parse_cpuinfo(t), 2) for t in (avx2_epyc, TURIN)}
    assert len(classes) == 2


def test_only_the_first_processor_block_is_read_and_isa_keeps_its_order():
    cpu = machine.parse_cpuinfo(GENOA + "\nprocessor\t: 1\nflags\t\t: amx_tile\n")
    assert (cpu.vendor, cpu.family, cpu.model) == ("amd", 25, 17)
    assert cpu.model_name == "AMD EPYC 9B14"
    assert cpu.isa == ("avx2", "avx512f", "avx512_bf16", "avx512_vnni")


def test_the_tier_is_read_from_the_flags_not_the_generation():
    """A Zen 4 whose hypervisor hides AVX-512 runs the AVX2 code: another class."""
    hidden = GENOA.replace(AVX512, "")
    assert machine.machine_class(machine.parse_cpuinfo(hidden), 2) == "amd-zen4-avx2-2c"


def test_cores_and_unknown_parts():
    assert machine.machine_class(machine.parse_cpuinfo(TURIN), 16) == "amd-zen5-avx512-16c"
    assert machine.machine_class(machine.parse_cpuinfo(""), 2) == "unknown"
    assert machine.machine_class(machine.parse_cpuinfo(TURIN), None) == "unknown"
    odd = TURIN.replace("cpu family\t: 26", "cpu family\t: 99")
    assert machine.machine_class(machine.parse_cpuinfo(odd), 2) == "amd-f99m2-avx512-2c"


def test_this_machine_has_a_class_and_a_usable_core_count():
    cores = machine.usable_cores()
    assert cores is not None and cores >= 1
    assert machine.machine_class(machine.read_cpu(), cores).endswith(f"-{cores}c")


def results(machine_facts: dict) -> dict:
    return {
        "meta": {
            "commit": "abc1234def",
            "dirty": False,
            "finished_at": "now",
            "workload": {"sha256": "x"},
            "machine": machine_facts,
            "versions": {"torch": "t", "transformers": "tr", "locust": "l"},
        },
        "config": {
            "profile": {"name": "quick", "max_tokens": 8, "run_time_s": 1.0,
                        "stop_timeout_s": 1.0, "max_requests": 4},
            "dtype": "float32",
        },
        "steps": [],
    }  # fmt: skip


TURIN_FACTS = {
    "machine_class": "amd-zen5-avx512-2c",
    "isa": ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"],
    "cpu_model": "AMD EPYC",
    "cores": 2,
    "memory_gb": 8,
    "device": "cpu",
}


def test_the_table_header_and_the_history_line_name_the_class():
    header = report.markdown(results(TURIN_FACTS)).splitlines()[1]
    assert header.startswith("Machine class **amd-zen5-avx512-2c (avx512_bf16, avx512_vnni)**")
    assert history.summary_line(results(TURIN_FACTS))["machine_class"] == "amd-zen5-avx512-2c"


def test_a_run_recorded_before_the_class_is_of_unknown_class():
    old = {k: v for k, v in TURIN_FACTS.items() if k not in ("machine_class", "isa")}
    assert history.summary_line(results(old))["machine_class"] == "unknown"
    assert "Machine class **unknown**" in report.markdown(results(old))


def test_every_committed_history_line_names_a_class():
    assert all(line.get("machine_class") for line in history.read())
