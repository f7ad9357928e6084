"""spotlighter.machine: the CPU name every figure records, and the cores jobs share."""

import os

from spotlighter import machine


def test_cpu_name_reads_the_model_name(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Example CPU @ 2.0GHz\nflags\t: a b\n")
    monkeypatch.setattr(machine, "CPUINFO", str(info))
    assert machine.cpu_name() == "Example CPU @ 2.0GHz"


def test_cpu_name_without_cpuinfo_falls_back_to_platform(monkeypatch, tmp_path):
    monkeypatch.setattr(machine, "CPUINFO", str(tmp_path / "missing"))
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    assert machine.cpu_name() == "x86_64"


def test_cores_is_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert machine.cores() == 3
