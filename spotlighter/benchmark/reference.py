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
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Mapping, Optional

import torch

from . import data, pretrain

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
SPARSE_KEY = "token_embedding.weight"


def weights_file(directory: Optional[str] = None) -> str:
    """The reference weights in ``directory`` (default: the shipped :data:`REFERENCE_DIR`)."""
    return os.path.join(directory or REFERENCE_DIR, f"minibench_clip_v{pretrain.PRETRAIN_VERSION}.pt")


def meta_file(directory: Optional[str] = None) -> str:
    return weights_file(directory)[: -len(".pt")] + ".json"


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
    return pretrain.build_clip(params).state_dict()


def read_meta(directory: Optional[str] = None) -> Optional[dict]:
    path = meta_file(directory)
    if not (os.path.isfile(path) and os.path.isfile(weights_file(directory))):
        return None
    with open(path) as f:
        return json.load(f)


def matches(params: dict, directory: Optional[str] = None) -> Optional[dict]:
    """The reference's metadata when it was pretrained with exactly ``params`` (normalised) under
    the current recipe and generator versions, else None."""
    meta = read_meta(directory)
    if meta is None or meta.get("pretrain_version") != pretrain.PRETRAIN_VERSION:
        return None
    ref = meta.get("params") or {}
    if ref.get("generator_version") != data.GENERATOR_VERSION:
        return None
    return meta if json.dumps(ref, sort_keys=True) == json.dumps(pretrain._normalise(params), sort_keys=True) else None


def export(clip_path: str, directory: Optional[str] = None) -> dict:
    """Write the reference from a CLIP built by ``prepare`` (its sidecar gives the recipe)."""
    side = pretrain.read_sidecar(clip_path)
    if side is None:
        raise ValueError(f"{clip_path}: no complete MiniBench CLIP there (weights and {pretrain.sidecar_path(clip_path)} "
                         "are written by `python -m spotlighter.benchmark prepare`)")
    if side.get("pretrain_version") != pretrain.PRETRAIN_VERSION:
        raise ValueError(f"{clip_path}: pretrained with recipe {side.get('pretrain_version')}, "
                         f"this code's recipe is {pretrain.PRETRAIN_VERSION}; run prepare again first")
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
    os.makedirs(os.path.dirname(weights_file(directory)), exist_ok=True)
    tmp = weights_file(directory) + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, weights_file(directory))
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
    data._write_json_atomic(meta_file(directory), meta)
    # the round trip must give the same bits, or the reference is not written
    check = reconstruct(directory)
    if state_digest(check) != meta["digest"]:
        os.remove(meta_file(directory))
        raise RuntimeError("reference export: the reconstructed weights differ from the exported ones")
    return meta


def reconstruct(directory: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The reference's full float32 state dict (raises ``ValueError`` if its digest does not match)."""
    meta = read_meta(directory)
    if meta is None:
        raise ValueError(f"no reference MiniBench CLIP in {directory or REFERENCE_DIR} (expected {weights_file(directory)} and "
                         f"{meta_file(directory)})")
    try:
        payload = torch.load(weights_file(directory), map_location="cpu", weights_only=True)
        key = meta.get("sparse_key", SPARSE_KEY)
        init = _initial_state(meta["params"])
        emb = init[key].clone()
        emb[payload["sparse_rows"]] = payload["sparse_values"]
        # the model's own key order, so that the saved file has the same bytes as a pretrained one
        state = {k: emb if k == key else payload["dense"][k] for k in init}
        if set(payload["dense"]) != set(init) - {key}:
            raise KeyError(f"tensors {sorted(set(payload['dense']) ^ (set(init) - {key}))}")
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same actionable message
        raise ValueError(f"{weights_file(directory)}: not a readable reference CLIP ({type(e).__name__}: {e}); "
                         "restore it with `git checkout -- spotlighter/benchmark/reference` "
                         "or pretrain locally with `prepare --pretrain`") from None
    digest = state_digest(state)
    if digest != meta["digest"]:
        raise ValueError(
            f"{weights_file(directory)}: the reconstructed reference CLIP has digest {digest[:16]}..., its "
            f"{os.path.basename(meta_file(directory))} records {meta['digest'][:16]}... (a damaged file, or "
            f"this machine initialises the untrained token-embedding rows differently: torch "
            f"{torch.__version__} here, {meta.get('torch')} at export). Pretrain locally with "
            "`python -m spotlighter.benchmark prepare --pretrain --root DATA`.")
    return state


def install(path: str, directory: Optional[str] = None) -> dict:
    """Write the reference weights to ``path`` (a float32 state dict, as pretraining writes it) and
    return the part of the sidecar that describes them."""
    state = reconstruct(directory)
    meta = read_meta(directory)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return {
        "origin": "reference",
        "reference": os.path.basename(weights_file(directory)),
        "digest": meta["digest"],
        "cpu": meta.get("cpu"),
        "torch": meta.get("torch"),
        "torch_threads": meta.get("torch_threads"),
        "train_seconds": meta.get("train_seconds"),
    }


