"""scripts/gpu_check.sh / spotlighter.gpucheck: the CPU mode on a tiny CLIP, the skip, a failure."""

import io
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from spotlighter import gpucheck

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAINERS = ["ZeroshotCLIP", "CoOp", "CoCoOp", "MaPLe", "IVLP", "PromptSRC", "PromptKD", "Spotlighter-paper",
            "Spotlighter-release", "Spotlighter-paper-prune", "SpotlighterKD-release", "SpotlighterKD-paper",
            "SpotlighterKD-textrefiner"]


def test_cpu_mode_trains_and_evaluates_every_trainer_in_every_precision():
    out = io.StringIO()
    failures = gpucheck.run("cpu", "tiny", steps=1, batch=2, out=out)
    lines = out.getvalue().splitlines()
    assert failures == 0
    results = [ln for ln in lines if ln.startswith(("PASS", "FAIL"))]
    assert len(results) == len(TRAINERS) * 3
    for trainer in TRAINERS:
        for precision in ("fp32", "fp16", "amp"):
            line = next(ln for ln in results if ln.split()[1:3] == [trainer, precision])
            assert line.startswith("PASS"), line
            if trainer == "ZeroshotCLIP":
                assert "eval only" in line
            else:
                assert re.search(r"train 1 steps loss [\d.]+->[\d.]+ \([1-9]\d*/\d+ tensors moved\)", line), line
            if precision != "fp32":  # compared with the fp32 run of the same weights and init
                diff = float(re.search(r"max\|logits-fp32\| ([\d.e-]+)", line).group(1))
                assert diff < 0.5, line
    assert re.fullmatch(f"gpu_check: {len(TRAINERS) * 3} passed, 0 failed; peak memory [\\d.]+ GiB resident \\(CPU\\)",
                        lines[-1]), lines[-1]


def test_without_cuda_it_skips_cleanly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = io.StringIO()
    assert gpucheck.run("cuda", out=out) == -1
    assert out.getvalue().startswith("SKIP gpu_check: no CUDA device")
    assert gpucheck.main([]) == 0


def test_a_non_finite_loss_is_a_fail_line_and_exit_1(monkeypatch):
    from spotlighter import models

    def nan_forward(self, images, labels=None):
        logits = torch.zeros(images.shape[0], len(gpucheck.CLASSNAMES), requires_grad=True)
        return logits, ({"ce": logits.sum() * float("nan")} if labels is not None else {})

    monkeypatch.setattr(models.CoOp, "forward", nan_forward)
    out = io.StringIO()
    assert gpucheck.run("cpu", "tiny", steps=1, batch=2, precisions=["fp32"], trainers=["CoOp"], out=out) == 1
    assert "FAIL CoOp" in out.getvalue() and "step 1: loss nan" in out.getvalue()
    assert re.fullmatch(r"gpu_check: 0 passed, 1 failed; peak memory [\d.]+ GiB resident \(CPU\)",
                        out.getvalue().splitlines()[-1]), out.getvalue()


def test_the_script(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    skip = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert skip.returncode == 0 and "SKIP gpu_check: no CUDA device" in skip.stdout
    one = subprocess.run(["bash", os.path.join(ROOT, "scripts/gpu_check.sh"), "--device", "cpu", "--size", "tiny", "--steps", "1",
                          "--batch", "2", "--trainers", "MaPLe", "--precisions", "fp16"],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    assert re.search(r"^PASS MaPLe +fp16 ", one.stdout, re.M) and "1 passed, 0 failed" in one.stdout
    bad = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--precisions", "fp8"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown precision(s) ['fp8']" in bad.stderr


def test_dtype_table_before_and_now():
    out = io.StringIO()
    gpucheck.dtype_table("tiny", out=out)
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:4]] for ln in out.getvalue().splitlines()
            if ln.startswith("| ") and "kind" not in ln}
    assert rows["LayerNorm.weight"] == rows["Embedding.weight"] == rows["logit_scale"] == ["float16", "float32"]
    assert rows["Conv2d.weight"] == rows["MultiheadAttention.in_proj_weight"] == rows["proj"] == ["float16", "float16"]
    assert "CPU image+text forward, before: RuntimeError: mixed dtype" in out.getvalue()
    assert "CPU image+text forward, now: runs" in out.getvalue()
