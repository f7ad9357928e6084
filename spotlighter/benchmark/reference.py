"""The reference MiniBench CLIP shipped with the repository.

Pretraining is deterministic on one CPU kind, but the weights depend on the CPU's floating-point
kernels (AVX-512 vs AVX2 paths, MKL's vendor dispatch) and on the thread count: the same recipe
pretrained on an AMD EPYC and on an Intel Xeon gives CLIPs whose zero-shot accuracies differ by
2.5 points and whose CoOp new-class accuracies differ by 3. MKL's reproducible mode
(``MKL_CBWR``) only covers Intel CPUs except in its SSE2 ``COMPATIBLE`` branch, which made
pretraining 1.85x slower here. So the benchmark ships the weights themselves: ``prepare`` installs
this reference CLIP when the requested recipe is the reference's, and every machine measures with
the same model. ``prepare --pretrain`` pretrains locally instead (the recipe is unchanged; on the
reference's CPU kind and thread count it reproduces the reference bytes).

The file holds every trained tensor. The token embedding (49,408 x 128, 25 MB) is stored sparsely:
rows no caption ever used get no gradient and no weight decay (``pretrain._param_groups``), so
they keep their seeded initial values, which :func:`install` regenerates with ``build_clip``. The
digest of the reconstructed state dict is checked against the one recorded at export.

An installed MiniBench CLIP (``DATA/minibench/clip/minibench_clip.pt``) is checked on every load
(:func:`check_clip`, called by ``spotlighter.backbone.load_state_dict_file``) and by every
``prepare``: one whose sidecar says it is the shipped reference must have the digest of the
reference in this repository (not merely the digest its sidecar records, which a swapped file could
come with); one pretrained here must have the digest its sidecar recorded at pretraining.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Mapping, Optional, Tuple

import torch

from ..fileio import atomic_path
from . import data
from .paths import CLIP_FILES, data_root, read_sidecar, sidecar_path
from .recipe import CLIP_SIZES, PRETRAIN_VERSION, STUDENT, build_clip, normalise_params

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
SPARSE_KEY = "token_embedding.weight"


def weights_file(directory: Optional[str] = None, size: str = STUDENT) -> str:
    """The reference weights of CLIP size ``size`` in ``directory`` (default: the shipped :data:`REFERENCE_DIR`):
    ``minibench_clip_v<recipe>.pt``, ``minibench_clip_teacher_v<recipe>.pt``."""
    stem = os.path.splitext(CLIP_FILES[size])[0]
    return os.path.join(directory or REFERENCE_DIR, f"{stem}_v{PRETRAIN_VERSION}.pt")


def meta_file(directory: Optional[str] = None, size: str = STUDENT) -> str:
    return weights_file(directory, size)[: -len(".pt")] + ".json"


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order: equal digests mean
    bit-identical weights, whatever file format holds them."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def file_digest(path: str) -> str:
    """:func:`state_digest` of a saved float32 state dict."""
    return state_digest(torch.load(path, map_location="cpu", weights_only=True))


def _initial_state(params: dict) -> Dict[str, torch.Tensor]:
    torch.manual_seed(params["seed"])
    return build_clip(params).state_dict()


def read_meta(directory: Optional[str] = None, size: str = STUDENT) -> Optional[dict]:
    path = meta_file(directory, size)
    if not (os.path.isfile(path) and os.path.isfile(weights_file(directory, size))):
        return None
    with open(path) as f:
        return json.load(f)


def matches(params: dict, directory: Optional[str] = None) -> Optional[dict]:
    """The metadata of the reference (of any size; its ``"size"`` is added) that was pretrained with
    exactly ``params`` (normalised) under the current recipe and generator versions, else None."""
    want = json.dumps(normalise_params(params), sort_keys=True)
    for size in CLIP_SIZES:
        meta = read_meta(directory, size)
        if meta is None or meta.get("pretrain_version") != PRETRAIN_VERSION:
            continue
        ref = meta.get("params") or {}
        if ref.get("generator_version") == data.GENERATOR_VERSION and json.dumps(ref, sort_keys=True) == want:
            return {**meta, "size": size}
    return None


def export(clip_path: str, directory: Optional[str] = None, size: str = STUDENT) -> dict:
    """Write the reference of CLIP size ``size`` from a CLIP built by ``prepare`` (its sidecar gives the recipe)."""
    side = read_sidecar(clip_path)
    if side is None:
        raise ValueError(f"{clip_path}: no complete MiniBench CLIP there (weights and {sidecar_path(clip_path)} "
                         "are written by `python -m spotlighter.benchmark prepare`)")
    if side.get("pretrain_version") != PRETRAIN_VERSION:
        raise ValueError(f"{clip_path}: pretrained with recipe {side.get('pretrain_version')}, "
                         f"this code's recipe is {PRETRAIN_VERSION}; run prepare again first")
    params = side["params"]
    state = torch.load(clip_path, map_location="cpu", weights_only=True)
    init = _initial_state(params)
    emb, emb0 = state[SPARSE_KEY], init[SPARSE_KEY]
    rows = torch.nonzero((emb != emb0).any(dim=1)).flatten()
    payload = {
        "dense": {k: v for k, v in state.items() if k != SPARSE_KEY},
        "sparse_rows": rows,
        "sparse_values": emb[rows].clone(),
    }
    os.makedirs(os.path.dirname(weights_file(directory, size)), exist_ok=True)
    with atomic_path(weights_file(directory, size)) as tmp:
        torch.save(payload, tmp)
    meta = {
        "pretrain_version": side["pretrain_version"],
        "params": params,
        "digest": state_digest(state),
        "sparse_key": SPARSE_KEY,
        "sparse_rows": int(rows.numel()),
        **{k: side.get(k) for k in ("cpu", "torch", "torch_threads", "train_seconds", "zeroshot", "zeroshot_targets")},
    }
    for z in [meta.get("zeroshot")] + list((meta.get("zeroshot_targets") or {}).values()):
        if isinstance(z, dict):
            z.pop("dataset_dir", None)
    data._write_json_atomic(meta_file(directory, size), meta)
    # the round trip must give the same bits, or the reference is not written
    check = reconstruct(directory, size)
    if state_digest(check) != meta["digest"]:
        os.remove(meta_file(directory, size))
        raise RuntimeError("reference export: the reconstructed weights differ from the exported ones")
    return meta


def reconstruct(directory: Optional[str] = None, size: str = STUDENT) -> Dict[str, torch.Tensor]:
    """The reference's full float32 state dict (raises ``ValueError`` if its digest does not match)."""
    meta = read_meta(directory, size)
    if meta is None:
        raise ValueError(f"no reference MiniBench CLIP in {directory or REFERENCE_DIR} (expected {weights_file(directory, size)} and "
                         f"{meta_file(directory, size)})")
    try:
        payload = torch.load(weights_file(directory, size), map_location="cpu", weights_only=True)
        key = meta.get("sparse_key", SPARSE_KEY)
        init = _initial_state(meta["params"])
        emb = init[key].clone()
        emb[payload["sparse_rows"]] = payload["sparse_values"]
        # the model's own key order, so that the saved file has the same bytes as a pretrained one
        state = {k: emb if k == key else payload["dense"][k] for k in init}
        if set(payload["dense"]) != set(init) - {key}:
            raise KeyError(f"tensors {sorted(set(payload['dense']) ^ (set(init) - {key}))}")
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same actionable message
        raise ValueError(f"{weights_file(directory, size)}: not a readable reference CLIP ({type(e).__name__}: {e}); "
                         "restore it with `git checkout -- spotlighter/benchmark/reference` "
                         "or pretrain locally with `prepare --pretrain`") from None
    digest = state_digest(state)
    if digest != meta["digest"]:
        raise ValueError(
            f"{weights_file(directory, size)}: the reconstructed reference CLIP has digest {digest[:16]}..., its "
            f"{os.path.basename(meta_file(directory, size))} records {meta['digest'][:16]}... (a damaged file, or "
            f"this machine initialises the untrained token-embedding rows differently: torch "
            f"{torch.__version__} here, {meta.get('torch')} at export). Pretrain locally with "
            "`python -m spotlighter.benchmark prepare --pretrain --root DATA`.")
    return state


def install(path: str, directory: Optional[str] = None, size: str = STUDENT) -> dict:
    """Write the reference weights to ``path`` (a float32 state dict, as pretraining writes it) and
    return the part of the sidecar that describes them."""
    state = reconstruct(directory, size)
    meta = read_meta(directory, size)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return {
        "origin": "reference",
        "reference": os.path.basename(weights_file(directory, size)),
        "digest": meta["digest"],
        "cpu": meta.get("cpu"),
        "torch": meta.get("torch"),
        "torch_threads": meta.get("torch_threads"),
        "train_seconds": meta.get("train_seconds"),
    }




class ClipMismatch(ValueError):
    """A MiniBench CLIP that is not the one it claims to be: ``problem`` says how, the message adds the fix."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path} is not the MiniBench CLIP it claims to be: {problem}. {advice(path)}")


def advice(path: str) -> str:
    """How to restore the MiniBench CLIP at ``path``."""
    return (f"Restore it with `python -m spotlighter.benchmark prepare --root {data_root(path) or 'DATA'}` "
            "(with the options it was prepared with): prepare checks the CLIP and installs the shipped "
            "reference CLIP again, or pretrains it again when its recipe is not the reference's.")


def _read_claim(path: str):
    """The sidecar beside ``path`` when it is a MiniBench CLIP's (has ``pretrain_version``), else None;
    raises ``OSError``/``ValueError`` when it cannot be read."""
    with open(sidecar_path(path)) as f:
        side = json.load(f)
    return side if isinstance(side, dict) and "pretrain_version" in side else None


def claims_minibench(path: str) -> bool:
    """Whether ``path`` is, or says it is, a MiniBench CLIP: it sits where ``prepare`` puts it, or a
    MiniBench sidecar is beside it."""
    if data_root(path) is not None:
        return True
    try:
        return _read_claim(path) is not None
    except (OSError, ValueError):
        return False


def expected_digest(path: str, side: dict) -> Tuple[str, str]:
    """The digest the CLIP at ``path`` must have, and where that digest comes from, in words."""
    if side.get("origin") == "reference":
        ref = matches(side.get("params") or {}) if side.get("pretrain_version") == PRETRAIN_VERSION else None
        if ref is None:
            raise ClipMismatch(path, f"its sidecar says it is the shipped reference CLIP, but no shipped reference "
                                     f"CLIP has its recipe (pretraining recipe {side.get('pretrain_version')}; this "
                                     f"code ships recipe {PRETRAIN_VERSION} in {meta_file()})")
        return ref["digest"], f"the shipped reference CLIP's ({meta_file(size=ref['size'])})"
    digest = side.get("digest")
    if not (isinstance(digest, str) and len(digest) == 64):
        raise ClipMismatch(path, f"its sidecar {sidecar_path(path)} records no digest")
    return digest, f"the one recorded when it was pretrained ({sidecar_path(path)})"


def check_clip(path: str, state: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
    """Raise :class:`ClipMismatch` unless the MiniBench CLIP at ``path`` (its loaded ``state``, else
    read here) has the digest it must have (:func:`expected_digest`); return its sidecar."""
    sidecar = sidecar_path(path)
    try:
        side = _read_claim(path)
    except FileNotFoundError:
        side = None
    except (OSError, ValueError) as e:
        raise ClipMismatch(path, f"its sidecar {sidecar} cannot be read ({e})") from None
    if side is None:
        raise ClipMismatch(path, f"no sidecar {sidecar} says which MiniBench CLIP it is (prepare writes it "
                                 "after the weights: an interrupted prepare, or weights copied there)")
    expected, source = expected_digest(path, side)
    try:
        if state is None:
            state = torch.load(path, map_location="cpu", weights_only=True)
        actual = state_digest(state)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a mismatch
        raise ClipMismatch(path, f"its weights cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    if actual != expected:
        raise ClipMismatch(path, f"its weights have digest {actual[:16]}..., {source} is {expected[:16]}... "
                                 "(weights replaced, damaged or cut short)")
    return side
