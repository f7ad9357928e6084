"""spotlighter.bench: argument checks, the report's side-by-side ratios, checkpoint size, and one
tiny end-to-end run (figures are printed by the command, never asserted as timings)."""

import io
import json
import os

import pytest
import torch
import yaml

from spotlighter import bench
from spotlighter.backbone import PruneSpec
from spotlighter.config import RECOMMENDED_PRUNE

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(embed_dim=64, image_resolution=32, vision_layers=4, vision_width=128, vision_patch_size=8,
            transformer_width=64, transformer_layers=2)


def test_prune_arg_and_label():
    assert bench.prune_arg("3,6:0.5") == PruneSpec((3, 6), 0.5)
    assert PruneSpec((3,), 0.25).label == "3:0.25"
    assert bench.prune_arg("3,6:0.7:merge") == PruneSpec((3, 6), 0.7, mode="merge")
    assert PruneSpec((3, 6), 0.7, mode="merge").label == "3,6:0.7:merge"
    for bad in ("3-0.5", "3:0.5:blend"):
        with pytest.raises(Exception, match="LAYERS:KEEP"):
            bench.prune_arg(bad)


def test_bad_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "clip"])
    assert "--models: 'clip' is not one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--precision", "fp16"])
    assert "needs a CUDA device" in capsys.readouterr().err


def test_entries_expand_prune_settings():
    rows = bench.entries(["zsclip", "paper+prune"], [PruneSpec((3,), 0.5), PruneSpec((6,), 0.5)])
    assert [(e.name, e.kind, e.prune) for e in rows] == [
        ("zsclip", "zsclip", None), ("paper prune 3:0.5", "paper", PruneSpec((3,), 0.5)),
        ("paper prune 6:0.5", "paper", PruneSpec((6,), 0.5))]


def test_noise_floor_row_is_a_second_zsclip_after_the_baseline():
    rows = bench.entries(["coop", "zsclip"], [], noise_floor=True)
    assert [(e.name, e.kind, e.prune) for e in rows] == [
        ("coop", "coop", None), ("zsclip", "zsclip", None), (bench.NOISE_FLOOR, "zsclip", None)]
    args = bench.parse_args(["--device", "cpu", "--reps", "3", "--noise-floor"])
    assert args.noise_floor and args.batches == 1
    for e, times in zip(rows, ([2.0, 2.0, 2.0], [1.0, 2.0, 1.0], [1.0, 1.0, 2.0])):
        e.eval_times, e.info = times, {"classes": 1000, "trainable": 0, "checkpoint_bytes": 0}
    report = {r["model"]: r for r in bench.make_report(args, rows)["rows"]}
    # ratios are to the first zero-shot CLIP, never to the noise-floor copy
    assert report["zsclip"]["eval_ratio_to_zsclip"] == {"median": 1.0, "min": 1.0, "max": 1.0, "n": 3}
    assert report[bench.NOISE_FLOOR]["eval_ratio_to_zsclip"] == {"median": 1.0, "min": 0.5, "max": 2.0, "n": 3}


def test_timed_sample_is_the_mean_of_its_batches(monkeypatch):
    calls, clock = [], iter([10.0, 16.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert bench.timed(lambda: calls.append(1), torch.device("cpu"), batches=3) == 2.0
    assert len(calls) == 3
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--batches", "0"])


def test_report_ratios_are_taken_within_each_rep():
    args = bench.parse_args(["--device", "cpu", "--reps", "3"])
    zs, coop = bench.Entry("zsclip", "zsclip"), bench.Entry("coop", "coop")
    zs.eval_times, coop.eval_times = [1.0, 2.0, 4.0], [0.5, 4.0, 2.0]  # a noisy machine: rep 2 slowed ZS
    coop.train_times = [3.0, 3.0, 6.0]
    for e in (zs, coop):
        e.info = {"classes": 1000, "trainable": 0, "checkpoint_bytes": 0}
    rows = {r["model"]: r for r in bench.make_report(args, [zs, coop])["rows"]}
    assert rows["coop"]["eval_ratio_to_zsclip"] == {"median": 2.0, "min": 0.5, "max": 2.0, "n": 3}
    assert rows["zsclip"]["eval_ratio_to_zsclip"]["median"] == 1.0
    assert rows["coop"]["eval_images_per_s"]["median"] == 16 / 2.0
    assert rows["coop"]["train_ratio_to_coop"]["median"] == 1.0 and "train_step_s" not in rows["zsclip"]


def test_each_rep_starts_one_model_later():
    rows = ["zsclip", "coop", "paper"]
    orders = [bench.rep_order(rows, k) for k in range(4)]
    assert orders == [["zsclip", "coop", "paper"], ["coop", "paper", "zsclip"],
                      ["paper", "zsclip", "coop"], ["zsclip", "coop", "paper"]]
    firsts = [o[0] for o in orders[:3]]
    assert sorted(firsts) == sorted(rows)  # every model is timed first once per len(rows) reps
    assert bench.rep_order([], 2) == []


@pytest.mark.parametrize("preset", ["paper", "release"])
def test_shipped_prune_config_is_the_benchmarked_setting(preset):
    keys = ("LAYERS", "KEEP", "FUSE", "MODE")
    with open(os.path.join(ROOT, f"configs/trainers/Spotlighter/vit_b16_ep20_{preset}_prune.yaml")) as f:
        cfg = yaml.safe_load(f)
    prune = cfg["MODEL"]["PRUNE"]
    assert cfg["TRAINER"]["SPOTLIGHTER"]["PRESET"] == preset
    assert {k: prune[k] for k in keys} == RECOMMENDED_PRUNE[preset]
    assert PruneSpec.recommended(preset) in bench.default_prunes()
    assert PruneSpec.recommended(preset) == PruneSpec(tuple(prune["LAYERS"]), prune["KEEP"], prune["FUSE"],
                                                        mode=prune["MODE"])
    # its MiniBench twin reduces at the same relative depth (block b of 4 <-> block 3b of 12), same rate
    with open(os.path.join(ROOT, f"configs/trainers/Spotlighter/minibench_ep10_{preset}_prune.yaml")) as f:
        twin_cfg = yaml.safe_load(f)
    twin = twin_cfg["MODEL"]["PRUNE"]
    assert twin_cfg["TRAINER"]["SPOTLIGHTER"]["PRESET"] == preset
    assert [3 * b for b in twin["LAYERS"]] == prune["LAYERS"]
    assert [twin[k] for k in keys[1:] + ("IN_TRAINING",)] == [prune[k] for k in keys[1:] + ("IN_TRAINING",)]
    # and each differs from its unpruned config only by MODEL.PRUNE
    for name, pruned in ((f"vit_b16_ep20_{preset}", cfg), (f"minibench_ep10_{preset}", twin_cfg)):
        with open(os.path.join(ROOT, f"configs/trainers/Spotlighter/{name}.yaml")) as f:
            plain = yaml.safe_load(f)
        rest = {k: v for k, v in pruned["MODEL"].items() if k != "PRUNE"}
        assert {**pruned, "MODEL": rest} == plain, name


@pytest.fixture()
def tiny_arch():
    assert bench.ARCHS["tiny"] == TINY  # the command's own toy architecture


def test_checkpoint_size_is_what_a_trainer_saves(tiny_arch):
    from spotlighter.checkpoint import trainable_state

    full, light = bench.build_clips("tiny", torch.device("cpu"), torch.float32)
    model = bench.build_model("paper", light, None, 7, "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sum(p.sum() for p in params).backward()
    opt.step()
    buf = io.BytesIO()
    torch.save({"state_dict": trainable_state(model), "class_state": model.head.memory.class_state(),
                "optimizer": opt.state_dict()}, buf)
    assert abs(bench.checkpoint_bytes(model) - buf.tell()) < 0.01 * buf.tell()


def test_every_evaluation_rep_runs_before_the_first_training_rep(tiny_arch, monkeypatch, capsys):
    """A training step's memory churn slows the evaluations after it, so the phases are separate."""
    calls = []
    monkeypatch.setattr(bench.EntrySteps, "eval_step", lambda self: calls.append("eval"))
    monkeypatch.setattr(bench.EntrySteps, "train_step", lambda self: calls.append("train"))
    assert bench.main(["--arch", "tiny", "--device", "cpu", "--classes", "4", "--batch", "2", "--train-batch", "2",
                       "--train-classes", "4", "--reps", "3", "--batches", "2", "--no-memory", "--threads", "1",
                       "--models", "zsclip", "coop", "paper"]) == 0
    timed_calls = calls[3 + 2:]  # after the warm-up: 3 evaluations and 2 training steps (ZS trains nothing)
    assert timed_calls == ["eval"] * (3 * 3 * 2) + ["train"] * (2 * 3 * 2)
    capsys.readouterr()


def test_tiny_end_to_end_json(tiny_arch, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--arch", "tiny", "--device", "cpu", "--classes", "6", "--slow-classes", "3", "--batch", "2",
                       "--train-batch", "2", "--train-classes", "4", "--reps", "2", "--no-memory", "--threads", "1",
                       "--models", "zsclip", "coop", "cocoop", "maple", "paper", "release", "zsclip+prune",
                       "--prune", "1:0.5", "--batches", "2", "--noise-floor", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ["zsclip", "coop", "cocoop", "maple", "paper", "release", "zsclip prune 1:0.5",
                          bench.NOISE_FLOOR]
    assert report["batches_per_rep"] == 2 and report["hardware"] == bench.cpu_name() != ""
    assert rows["zsclip"]["eval_ratio_to_zsclip"]["median"] == 1.0
    assert rows["coop"]["train_ratio_to_coop"]["median"] == 1.0
    assert rows["cocoop"]["classes"] == 3 and rows["paper"]["classes"] == 6  # text per batch: fewer on CPU
    assert rows["zsclip prune 1:0.5"]["patches_left"] == 8
    assert rows["coop"]["trainable"] == 4 * 64 and rows["zsclip"]["trainable"] == 0
    assert rows["paper"]["trainable"] == rows["release"]["trainable"] > rows["coop"]["trainable"]
    assert min(rows["paper"]["checkpoint_bytes"], rows["release"]["checkpoint_bytes"]) > 4 * rows["paper"]["trainable"]
    assert all(r["eval_images_per_s"]["n"] == 2 for r in report["rows"])
    text = capsys.readouterr().out
    assert "| zsclip prune 1:0.5 | 6 |" in text and "eval vs ZS-CLIP" in text


def test_distilled_students_are_benchmarked_with_a_teacher(tiny_arch, tmp_path, capsys):
    """PromptKD, SpotlighterKD and TextRefiner: a frozen teacher on --teacher-arch; the students' trainable
    tensors are the released ones (prompts + projectors, + TRM and IRM for SpotlighterKD)."""
    out = tmp_path / "kd.json"
    assert bench.main(["--arch", "tiny", "--teacher-arch", "tiny", "--device", "cpu", "--classes", "6",
                       "--batch", "2", "--train-batch", "2", "--train-classes", "4", "--reps", "1", "--no-memory",
                       "--threads", "1", "--models", "zsclip", "coop", "promptkd", "spotlighterkd", "textrefiner",
                       "spotlighterkd_paper", "--json", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    d = 64  # the tiny CLIP's embedding (student and teacher)
    projector = d * d + d + 2 * d + d * d + d
    assert rows["promptkd"]["trainable"] == 4 * 4 * 128 + projector  # depth capped at the tiny CLIP's 4 blocks
    assert rows["textrefiner"]["trainable"] == rows["promptkd"]["trainable"] + projector + 2 * d * d
    assert rows["spotlighterkd"]["trainable"] == rows["textrefiner"]["trainable"] + 4 * (d * d + d)
    assert rows["spotlighterkd"]["train_step_s"]["n"] == 1
    # paper: class prototypes (MEMORY.KIND class, a buffer) instead of the trained 25-slot memory; the same
    # projectors, TRM and IRM of the token sets
    assert rows["spotlighterkd_paper"]["train_step_s"]["n"] == 1
    assert rows["spotlighterkd_paper"]["trainable"] == rows["spotlighterkd"]["trainable"]
    capsys.readouterr()


def test_encoder_macs_cost_model():
    """Spec's cost model: ViT-B/16 block ~ 12·N·D² + 2·N²·D, 17.4 G for the 12 blocks."""
    full = bench.encoder_macs("ViT-B/16")
    assert full == 12 * (12 * 197 * 768 ** 2 + 2 * 197 ** 2 * 768) and abs(full / 1e9 - 17.4) < 0.1
    # keep 98 of 196 patches after the attention of block 6: MLP of 6 and blocks 7-11 on 1 + 98 + 1 tokens
    half = bench.encoder_macs("ViT-B/16", PruneSpec((6,), 0.5))
    n = 100
    expect = 6 * (12 * 197 * 768 ** 2 + 2 * 197 ** 2 * 768) + 4 * 197 * 768 ** 2 + 2 * 197 ** 2 * 768 \
        + 8 * n * 768 ** 2 + 5 * (12 * n * 768 ** 2 + 2 * n * n * 768)
    assert half == expect
    assert bench.encoder_macs("ViT-B/16", PruneSpec((6,), 0.5, fuse=False)) < half
    # merging: no fused token, plus the (98 x 98) matching of 64-dimensional keys at block 6
    merged = bench.encoder_macs("ViT-B/16", PruneSpec((6,), 0.5, mode="merge"))
    m = 99
    assert merged == 6 * (12 * 197 * 768 ** 2 + 2 * 197 ** 2 * 768) + 4 * 197 * 768 ** 2 + 2 * 197 ** 2 * 768 \
        + 98 * 98 * 64 + 8 * m * 768 ** 2 + 5 * (12 * m * 768 ** 2 + 2 * m * m * 768)


def test_flops_only_prints_the_bound(capsys):
    assert bench.main(["--flops-only", "--prune", "6:0.5", "3:0.25"]) == 0
    out = capsys.readouterr().out
    assert "| none | 17.45 | 1.00× |" in out and "| 6:0.5 |" in out and "| 3:0.25 |" in out


def test_cpu_peak_memory_probe_runs_a_fresh_process_per_model(tmp_path):
    out = tmp_path / "m.json"
    assert bench.main(["--arch", "tiny", "--device", "cpu", "--classes", "6", "--batch", "2", "--train-batch", "2",
                       "--train-classes", "4", "--reps", "1", "--threads", "1", "--models", "zsclip", "paper",
                       "--json", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(r["peak_mb"] >= r["clip_only_peak_mb"] > 100 for r in rows.values())  # torch + CLIP alone
    assert rows["paper"]["peak_mb"] >= rows["zsclip"]["peak_mb"]  # a head, its optimiser and a backward pass
    if os.path.exists("/proc/self/clear_refs"):  # Linux: counted from the built CLIP, not its build transient
        assert all(r["peak_from_built_clip"] for r in rows.values())


def test_encoder_macs_of_the_authors_modes():
    """tome counts its matching like merge; evit's fused token competes with the patches of later blocks."""
    from spotlighter.backbone import PruneSpec
    from spotlighter.bench import encoder_macs

    merge = PruneSpec(layers=(0, 3, 6), keep=0.7, mode="merge")
    tome = PruneSpec(layers=(0, 3, 6), keep=0.7, mode="tome")
    drop = PruneSpec(layers=(0, 3, 6), keep=0.7, mode="drop")
    evit = PruneSpec(layers=(0, 3, 6), keep=0.7, mode="evit")
    full = encoder_macs("ViT-B/16")
    assert encoder_macs("ViT-B/16", tome) < full and encoder_macs("ViT-B/16", evit) < full
    assert encoder_macs("ViT-B/16", tome) == pytest.approx(encoder_macs("ViT-B/16", merge), rel=0.02)
    assert encoder_macs("ViT-B/16", evit) >= encoder_macs("ViT-B/16", drop)  # the fused token may be kept
