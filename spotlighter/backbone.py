"""The one frozen-CLIP module every trainer uses.

* :func:`load_clip` finds the weights (an OpenAI model name resolved in a weights folder and
  downloaded once with its checksum, or a local file), and builds ``clip.model.CLIP`` from them.
* :class:`FrozenCLIP` wraps the built model and runs its transformers block by block, so that
  prompt-learning methods can inject prompt tokens (shallow and deep) and Spotlighter can get, in a
  single image forward, the global feature, the last block's projected tokens and that block's
  CLS->patch attention. Only the last block materialises an attention map; every other block uses
  PyTorch's fused attention.
* :class:`PruneSpec` (``MODEL.PRUNE``) makes the image forward drop tokens EViT-style: at each listed
  block, between attention and MLP, keep the patch tokens the CLS token attends to most (head mean)
  and, optionally, fuse the dropped ones into one token; the remaining blocks run on CLS + kept
  (+ fused). With ``MODE = "merge"`` it merges tokens instead, ToMe-style (bipartite soft matching on
  the block's keys, size-weighted means, proportional attention in the later blocks). ``MODE = "evit"``
  and ``"tome"`` follow EViT's and ToMe's own rules exactly (docs/efficiency.md). Without a spec (or
  with ``LAYERS = []``) the forward is the unpruned one, bit for bit.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MERGE_MIN_KEEP, MERGING_MODES, PRUNE_MODES, RECOMMENDED_PRUNE
from .fileio import describe_unreadable

logger = logging.getLogger(__name__)

#: Environment variable naming the folder that holds (or receives) the OpenAI weight files.
WEIGHTS_DIR_ENV = "SPOTLIGHTER_CLIP_DIR"
#: Environment variable that forbids downloads (clusters without internet).
OFFLINE_ENV = "SPOTLIGHTER_OFFLINE"
DEFAULT_WEIGHTS_DIR = os.path.join("~", ".cache", "clip")  # the folder OpenAI's clip.load uses


#: ``ImageTokens.patch_index`` of a token that holds no single patch (EViT's fused token, ``MODE evit``).
FUSED_INDEX = -1


class BackboneError(RuntimeError):
    """Raised with a user-facing message when CLIP weights cannot be found or used."""


def _import_clip_quietly() -> None:
    """Import clip-anytorch without the pkg_resources deprecation notice it triggers on every run
    (it concerns clip's packaging, not the run; setup.py pins setuptools<82 for it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        try:
            import clip  # noqa: F401
        except ImportError:  # reported with the fix by _clip_module when it is needed
            pass


_import_clip_quietly()


def _clip_module():
    try:
        import clip  # noqa: F401  (clip-anytorch)
        from clip import clip as clip_api
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackboneError(
            "The `clip` package is not importable ({}). Install it with `pip install clip-anytorch` "
            "and keep setuptools below 82 (`pip install 'setuptools<82'`): clip imports "
            "pkg_resources.".format(exc)
        ) from exc
    return clip_api


def weights_dir() -> str:
    return os.path.expanduser(os.environ.get(WEIGHTS_DIR_ENV) or DEFAULT_WEIGHTS_DIR)


def resolve_weights(name: str, path: str = "") -> str:
    """Return a local weight file for backbone ``name`` (or the explicit ``path``).

    A file named like one of OpenAI's (``ViT-B-16.pt``, ...) is checked against the SHA-256 in its
    download URL every time it is resolved (:func:`verify_weights`)."""
    if path:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            from .benchmark import paths, reference

            if paths.data_root(path) is not None:  # a MiniBench CLIP (older $DATA folders lack the teacher-size one)
                raise BackboneError(f"MODEL.BACKBONE.PATH points to {path!r}, which is not a file: it is MiniBench's "
                                    f"{os.path.basename(path)}. {reference.advice(path)}")
            raise BackboneError(
                f"MODEL.BACKBONE.PATH points to {path!r}, which is not a file. Give the path of a "
                "CLIP weight file (an OpenAI TorchScript archive such as ViT-B-16.pt, or a state dict "
                "saved with torch.save(model.state_dict(), ...))."
            )
        expected = openai_sha256(os.path.basename(path))
        if expected is not None:  # named like one of OpenAI's files: it must be that file
            verify_weights(path, expected, os.path.basename(path))
        return path
    clip_api = _clip_module()
    models = clip_api._MODELS
    if name not in models:
        raise BackboneError(
            f"MODEL.BACKBONE.NAME {name!r} is not an OpenAI CLIP model ({', '.join(models)}). "
            "For other weights set MODEL.BACKBONE.PATH to a local file."
        )
    url = models[name]
    folder = weights_dir()
    target = os.path.join(folder, os.path.basename(url))
    if os.path.isfile(target):
        verify_weights(target, _url_sha256(url), name)
        return target
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise BackboneError(
            f"CLIP weights for {name} not found at {target} and {OFFLINE_ENV} forbids downloading. "
            f"Copy {os.path.basename(url)} there (or set {WEIGHTS_DIR_ENV} to the folder holding it, "
            "or MODEL.BACKBONE.PATH to the file)."
        )
    logger.info("Downloading %s to %s (checksum verified)", name, target)
    try:
        downloaded = clip_api._download(url, folder)
    except Exception as exc:  # network errors come in many types
        raise BackboneError(
            f"Could not download CLIP {name} ({exc}). On a machine without internet copy "
            f"{os.path.basename(url)} to {target} (or set {WEIGHTS_DIR_ENV} / MODEL.BACKBONE.PATH)."
        ) from exc
    verify_weights(downloaded, _url_sha256(url), name)
    return downloaded


def _url_sha256(url: str) -> str:
    """OpenAI's download URLs carry the file's SHA-256 as their second-to-last component."""
    return url.rstrip("/").split("/")[-2]


def openai_sha256(filename: str) -> Optional[str]:
    """The SHA-256 of OpenAI's weight file named ``filename`` (e.g. ViT-B-16.pt), or None."""
    try:
        models = _clip_module()._MODELS
    except BackboneError:
        return None
    for url in models.values():
        if os.path.basename(url) == filename:
            return _url_sha256(url)
    return None


#: Bytes read at a time while hashing a weight file.
HASH_CHUNK = 1 << 20


def verify_weights(path: str, expected: str, name: str) -> None:
    """Check ``path`` against OpenAI's SHA-256, on every call: a wrong, damaged or swapped file named
    like OpenAI's never trains silently. Nothing is remembered (no record a swapped file could come
    with); hashing ViT-B/16's 335 MiB takes about 0.25 s with the CPU's SHA instructions, 0.7 s without."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise BackboneError(
            f"{path} is not OpenAI's {name} weight file: its SHA-256 is {digest.hexdigest()}, the one "
            f"in its download URL is {expected}. Delete it (it is downloaded again, checksum verified) or "
            f"copy the right {os.path.basename(path)} there; for other weights set MODEL.BACKBONE.PATH to a "
            "file with another name.")


def _is_torchscript(path: str) -> bool:
    """OpenAI's archives are TorchScript zips (they hold ``code/`` and ``constants.pkl``); torch.save
    files hold neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


#: What a CLIP weight file must be, said with every error about one.
WEIGHTS_FIX = ("A CLIP weight file is an OpenAI TorchScript archive (e.g. ViT-B-16.pt as clip downloads it) "
               "or a state dict saved with torch.save(model.state_dict(), path): delete a damaged OpenAI "
               "file (it is downloaded again, checksum verified) or replace it with a good copy.")


def load_state_dict_file(path: str) -> dict:
    """Read a TorchScript archive or a plain state dict without running or unpickling anything but
    tensors (:mod:`spotlighter.weights` for archives, ``torch.load(weights_only=True)`` otherwise).

    A MiniBench CLIP (a file with the sidecar ``prepare`` writes, or at ``DATA/minibench/clip/``)
    must also be the CLIP its sidecar says: its digest is checked on every load
    (:func:`spotlighter.benchmark.reference.check_clip`)."""
    minibench = _minibench_claim(path)
    try:
        state = _read_state(path)
    except BackboneError as exc:
        if minibench is None:
            raise
        raise BackboneError(f"{exc} {minibench.advice(path)}") from None
    if minibench is not None:
        try:
            minibench.check_clip(path, state)
        except minibench.ClipMismatch as exc:
            raise BackboneError(str(exc)) from None
    return state


def _read_state(path: str) -> dict:
    from .weights import ArchiveError, UnsafeArchiveError, read_torchscript_state

    if _is_torchscript(path):
        try:
            return read_torchscript_state(path)
        except UnsafeArchiveError as exc:
            raise BackboneError(
                f"{path} was refused without running any of it: {exc}. A CLIP weight file holds tensors "
                "only; this one may have been crafted to run code. Use weights from a trusted source: "
                "OpenAI's files as clip downloads them (checksum verified) or a state dict saved with "
                "torch.save(model.state_dict(), path).") from None
        except ArchiveError as exc:
            raise BackboneError(f"{path} is a TorchScript archive that cannot be loaded: {exc}. "
                                f"{WEIGHTS_FIX}") from None
        except Exception as exc:  # zip and pickle parsers raise many types
            raise BackboneError(f"{path} is a TorchScript archive that cannot be loaded: it is "
                                f"{describe_unreadable(path, exc)}. {WEIGHTS_FIX}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"{path} is neither a TorchScript archive nor a state dict: it is "
                            f"{describe_unreadable(path, exc)}. {WEIGHTS_FIX}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "visual.conv1.weight" not in state and "visual.proj" not in state:
        raise BackboneError(f"{path} does not hold CLIP weights (no 'visual.*' tensors found).")
    return state


def _minibench_claim(path: str):
    """The MiniBench identity module when ``path`` is (or claims to be) a MiniBench CLIP, else None.
    Only files that may be one are checked: with a sidecar beside them (``path.json``) or named like
    one of MiniBench's CLIPs (:data:`spotlighter.benchmark.paths.CLIP_FILES`)."""
    from .benchmark import paths

    if not (os.path.isfile(paths.sidecar_path(path)) or os.path.basename(path) in paths.CLIP_FILES.values()):
        return None
    from .benchmark import reference

    return reference if reference.claims_minibench(path) else None


#: The precisions :func:`load_clip` builds: fp32, or OpenAI's half precision (``convert_weights``).
CLIP_DTYPES = (torch.float32, torch.float16)


def load_clip(name: str, path: str = "", device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build ``clip.model.CLIP`` from weights (see :func:`build_clip`) found by :func:`resolve_weights`;
    an ``openclip:<MODEL>[:<TAG>]`` name is an OpenCLIP model (:func:`spotlighter.openclip.load_openclip`)."""
    from .openclip import is_openclip, load_openclip

    if is_openclip(name):
        return load_openclip(name, path, device, dtype)
    file = resolve_weights(name, path)
    return build_clip(load_state_dict_file(file), device, dtype, source=file)


def build_clip(state: dict, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               source: str = "a state dict") -> nn.Module:
    """``clip.model.CLIP`` from a state dict; frozen, in eval mode, on ``device``.

    ``dtype`` float32 keeps the given values exactly. float16 is OpenAI's half precision, built by
    ``clip.model.convert_weights`` itself (what ``clip.load`` and the original CoOp/CoCoOp/MaPLe code
    run): convolutions, linear layers, attention projections, ``proj`` and ``text_projection`` in
    fp16; LayerNorms (which upcast their input to fp32), embeddings and ``logit_scale`` in fp32.
    """
    from clip.model import build_model, convert_weights

    if dtype not in CLIP_DTYPES:
        raise BackboneError(f"CLIP can be built in {', '.join(map(str, CLIP_DTYPES))}; got {dtype}.")
    try:
        model = build_model(dict(state))  # infers the architecture; casts weights to fp16
        # build_model rounds to fp16: reload the file's own values so fp32 weights stay exact.
        model = model.float()
        model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    except Exception as exc:
        raise BackboneError(f"Could not build CLIP from {source}: {exc}") from exc
    if dtype == torch.float16:
        convert_weights(model)  # from the exact fp32 values: the same rounding as build_model's
    model = model.to(device=device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    logger.info("Loaded CLIP from %s (%s, %s)", source, device, dtype)
    return model


@dataclass
class ImageTokens:
    """Outputs of one image forward (spec section 2)."""

    global_feat: torch.Tensor  # (B, d): exactly CLIP's encode_image
    tokens: torch.Tensor  # (B, N, d): last block's tokens through ln_post and proj, CLS at 0
    cls_attn: Optional[torch.Tensor]  # (B, N-1): last block's CLS->patch attention, head mean
    #: (B, N-1) original patch index (0-based, row-major on the patch grid) of ``tokens[:, 1:]`` when
    #: tokens were dropped (pruning); None when every patch is there (then token n+1 is patch n).
    #: A merged token has the index of the patch it was merged into; with ``MODE evit`` a fused token
    #: that a later block kept among its top-k has index :data:`FUSED_INDEX` (it holds no one patch).
    patch_index: Optional[torch.Tensor] = None
    #: per pruning block, (B, n) original patch indices of the tokens kept there (pictures, tests)
    kept_index: Tuple[torch.Tensor, ...] = ()


@dataclass(frozen=True)
class PruneSpec:
    """Token reduction in the image encoder (``MODEL.PRUNE``; see docs/efficiency.md).

    At each block in ``layers`` (0-based), after its attention and before its MLP, the ``n`` patch
    tokens present become ``ceil(keep * n)``:

    * ``mode = "drop"`` (EViT-style): keep those with the highest CLS attention of that block (head
      mean), in spatial order; with ``fuse`` the dropped patches (and an earlier fused token) become
      one token, their CLS-attention-weighted mean, which is never among the kept.
    * ``mode = "merge"`` (ToMe-style): the patches are split alternately into two sets A and B; each A
      token's most similar B token (cosine of the block's keys, head mean) is its match, and the
      ``n - ceil(keep * n)`` A tokens with the most similar matches are merged into them (a mean
      weighted by how many patches each token already holds), so ``keep`` must be >= 0.5. Every
      later attention adds ``log(size)`` to the keys' logits (proportional attention), so a token
      that holds s patches is attended to as if it were s copies. Spatial order is restored.
      ``fuse`` plays no part.
    * ``mode = "evit"``: EViT's rule. The ``n`` non-CLS tokens, an earlier fused token included,
      become the ``ceil(keep * n)`` with the highest CLS attention, in descending order of it, and
      (with ``fuse``) the others are fused into one token appended last: their sum weighted by
      their CLS attention (not renormalised). A fused token can be kept by a later block.
    * ``mode = "tome"``: ToMe's rule. The whole sequence, CLS included, is split alternately (CLS and
      the odd patches in A, the even patches in B; CLS is never merged); ``r`` A tokens are merged as
      in ``merge``, and the tokens are laid out [CLS, unmerged A, B], which the next block splits
      again. ``r > 0``: a constant ``r`` per block; ``r = 0``: ``n - ceil(keep * n)``; at most
      ``n // 2`` either way, as ToMe caps it.

    ``in_training``: also reduce in training forwards.
    """

    layers: Tuple[int, ...] = ()
    keep: float = 1.0
    fuse: bool = True
    in_training: bool = True
    mode: str = "drop"
    r: int = 0

    def __post_init__(self):
        if self.mode not in PRUNE_MODES:
            raise ValueError(f"prune mode must be one of {PRUNE_MODES}, got {self.mode!r}")
        if self.r < 0 or (self.r > 0 and self.mode != "tome"):
            raise ValueError(f"R (tokens merged per block) must be 0, or > 0 with mode tome; got {self.r} "
                             f"with mode {self.mode}")
        if self.mode in MERGING_MODES and self.r == 0 and self.active and self.keep < MERGE_MIN_KEEP:
            raise ValueError(f"merging keeps at least half of the tokens at each block (KEEP >= {MERGE_MIN_KEEP}), "
                             f"got {self.keep}")

    @classmethod
    def from_cfg(cls, node) -> "PruneSpec":
        return cls(tuple(int(i) for i in node.LAYERS), float(node.KEEP), bool(node.FUSE),
                   bool(node.IN_TRAINING), str(node.get("MODE", "drop")), int(node.get("R", 0)))

    @classmethod
    def recommended(cls, preset: str) -> "PruneSpec":
        """The shipped ViT-B/16 setting of a Spotlighter preset (``config.RECOMMENDED_PRUNE``)."""
        r = RECOMMENDED_PRUNE[preset]
        return cls(tuple(r["LAYERS"]), r["KEEP"], r["FUSE"], mode=r["MODE"])

    @classmethod
    def parse(cls, text: str) -> "PruneSpec":
        """``LAYERS:KEEP[:MODE]``, e.g. ``3:0.5``, ``3,6:0.7:merge`` (the benchmark and sweep syntax;
        a constant ``r`` is the config key ``MODEL.PRUNE.R`` only)."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in PRUNE_MODES):
            raise ValueError(f"{text!r} is not LAYERS:KEEP[:MODE] (e.g. 3,6:0.5 or 3,6:0.7:merge; "
                             f"MODE one of {', '.join(PRUNE_MODES)})")
        try:
            return cls(tuple(int(i) for i in parts[0].split(",")), float(parts[1]),
                       mode=parts[2] if len(parts) == 3 else "drop")
        except ValueError as e:
            raise ValueError(f"{text!r} is not LAYERS:KEEP[:MODE] (e.g. 3,6:0.5 or 3,6:0.7:merge): {e}") from None

    @property
    def label(self) -> str:
        """The :meth:`parse` syntax of this spec (the mode only when it is not the default); a
        constant ``r`` shows as ``rN`` in place of KEEP (a label only: :meth:`parse` takes KEEP)."""
        text = ",".join(map(str, self.layers)) + (f":r{self.r}" if self.r else f":{self.keep:g}")
        return text + (f":{self.mode}" if self.mode != "drop" else "")

    @property
    def extra_tokens(self) -> int:
        """Tokens besides CLS and the patches once a block has reduced (the fused token)."""
        return int(self.fuse and self.mode in ("drop", "evit"))

    @property
    def active(self) -> bool:
        return bool(self.layers) and (self.keep < 1.0 or (self.mode == "tome" and self.r > 0))

    def kept(self, n: int) -> int:
        """Tokens left of the ``n`` a reducing block gets (CLS aside; for ``evit``, a fused one in)."""
        if self.mode == "tome":
            return n - self.merged(n)
        return max(1, math.ceil(self.keep * n - 1e-9))

    def merged(self, n: int) -> int:
        """``tome``: tokens merged away of the ``n`` patch tokens present (ToMe caps r at ``n // 2``)."""
        return min(self.r if self.r > 0 else n - max(1, math.ceil(self.keep * n - 1e-9)), n // 2)

    def remaining(self, num_patches: int) -> int:
        """Tokens after CLS that reach the last block and are returned as patch tokens (the last
        fused token excluded; with ``evit`` an earlier fused token kept among the top-k included)."""
        n, fused = num_patches, 0
        if self.active:
            for _ in self.layers:
                candidates = n + fused if self.mode == "evit" else n  # evit: the fused token competes
                k = self.kept(candidates)
                if k < candidates:
                    n, fused = k, self.extra_tokens
        return n


def _block_attention(block: nn.Module, x: torch.Tensor, need_weights: bool):
    """Attention sub-layer of a ``clip.model.ResidualAttentionBlock`` (LND layout)."""
    h = block.ln_1(x)
    mask = block.attn_mask
    if mask is not None:
        n = x.shape[0]
        mask = mask[..., -n:, -n:].to(dtype=x.dtype, device=x.device)
    out, weights = block.attn(h, h, h, need_weights=need_weights, attn_mask=mask,
                              average_attn_weights=True)
    return out, weights


def _run_block(block: nn.Module, x: torch.Tensor, need_weights: bool = False):
    out, weights = _block_attention(block, x, need_weights)
    x = x + out
    x = x + block.mlp(block.ln_2(x))
    return x, weights


def _attention_with_cls_row(block: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor] = None,
                            need_keys: bool = False):
    """Attention sub-layer (fused kernel) plus the CLS query's attention row, head mean (B, N).

    Only the CLS row is computed explicitly (N scores per head), not the N x N map. ``size`` (B, N):
    how many patches each token holds (merging); its log is added to every key's logits
    (proportional attention). ``need_keys``: also return the keys, head mean (B, N, head dim)."""
    attn = block.attn
    N, B, E = x.shape
    H = attn.num_heads
    h = block.ln_1(x)
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(N, B, H, E // H).permute(1, 2, 0, 3) for t in (q, k, v))  # (B, H, N, hd)
    bias = None if size is None else size.log().to(q.dtype)[:, None, None, :]  # (B, 1, 1, N)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    logits = (q[:, :, :1] @ k.transpose(-1, -2)) * (E // H) ** -0.5
    cls_row = (logits if bias is None else logits + bias).softmax(dim=-1)
    out = attn.out_proj(out.permute(2, 0, 1, 3).reshape(N, B, E))
    if need_keys:
        return out, cls_row.mean(dim=1)[:, 0], k.mean(dim=1)
    return out, cls_row.mean(dim=1)[:, 0]


def _run_block_sized(block: nn.Module, x: torch.Tensor, size: torch.Tensor):
    """A vision block with proportional attention (tokens holding ``size`` patches); also returns
    the CLS attention row (head mean, with the same proportional bias)."""
    out, cls_row = _attention_with_cls_row(block, x, size)
    x = x + out
    return x + block.mlp(block.ln_2(x)), cls_row


def _merge_tokens(x: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, size: torch.Tensor,
                  spec: "PruneSpec"):
    """ToMe bipartite soft matching on x (N, B, D) laid out [CLS, n patches].

    ``keys`` (B, N, hd): the block's keys (head mean) for the similarity; ``index`` (B, n): each
    patch token's original patch (of a merged token: that of the B token it was merged into);
    ``size`` (B, N): patches each token holds. Returns the reduced x, index and size, the patch
    tokens back in the spatial order of their indices."""
    n = index.shape[1]
    r = n - spec.kept(n)
    if r <= 0:
        return x, index, size
    xb = x.transpose(0, 1)  # (B, N, D)
    B, _, D = xb.shape
    patches, psize = xb[:, 1:], size[:, 1:]
    metric = F.normalize(keys[:, 1:].float(), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    r = min(r, a.shape[1])
    best, match = (a @ b.transpose(-1, -2)).max(dim=-1)  # each A token's most similar B token
    order = best.argsort(dim=-1, descending=True, stable=True)
    src, unm = order[:, :r], order[:, r:]  # A tokens merged away / kept
    dst = match.gather(1, src)
    wa = (patches[:, ::2] * psize[:, ::2, None])
    wb = (patches[:, 1::2] * psize[:, 1::2, None])
    sa, sb = psize[:, ::2], psize[:, 1::2]
    wb = wb.scatter_add(1, dst[..., None].expand(-1, -1, D), wa.gather(1, src[..., None].expand(-1, -1, D)))
    sb = sb.scatter_add(1, dst, sa.gather(1, src))
    xa_u = patches[:, ::2].gather(1, unm[..., None].expand(-1, -1, D))
    tokens = torch.cat([xa_u, wb / sb[..., None].to(wb.dtype)], dim=1)
    new_size = torch.cat([sa.gather(1, unm), sb], dim=1)
    new_index = torch.cat([index[:, ::2].gather(1, unm), index[:, 1::2]], dim=1)
    pos = new_index.argsort(dim=1)  # back to spatial order (the kept tokens' original positions)
    tokens = tokens.gather(1, pos[..., None].expand(-1, -1, D))
    new_size, new_index = new_size.gather(1, pos), new_index.gather(1, pos)
    x = torch.cat([xb[:, :1], tokens], dim=1).transpose(0, 1)
    return x, new_index, torch.cat([size[:, :1], new_size], dim=1)


def _drop_tokens(x: torch.Tensor, cls_row: torch.Tensor, index: torch.Tensor, spec: PruneSpec):
    """x (N, B, D) laid out [CLS, n patches, fused?]; index (B, n) original patch indices.

    Returns the reduced x and the kept patches' original indices (kept in their spatial order)."""
    n = index.shape[1]
    keep = spec.kept(n)
    if keep >= n:
        return x, index
    has_fused = x.shape[0] == n + 2
    xb = x.transpose(0, 1)  # (B, N, D)
    patches = xb[:, 1:1 + n]
    scores = cls_row[:, 1:1 + n]
    top = scores.topk(keep, dim=1).indices.sort(dim=1).values
    kept = patches.gather(1, top.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    parts = [xb[:, :1], kept]
    if spec.fuse:
        w = scores.scatter(1, top, 0.0)  # CLS attention of the dropped patches
        num = torch.einsum("bn,bnd->bd", w, patches)
        den = w.sum(dim=1)
        if has_fused:
            num = num + cls_row[:, -1:] * xb[:, -1]
            den = den + cls_row[:, -1]
        parts.append((num / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)).unsqueeze(1))
    return torch.cat(parts, dim=1).transpose(0, 1), index.gather(1, top)


def _tome_tokens(x: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, size: torch.Tensor,
                 spec: "PruneSpec"):
    """ToMe's own bipartite soft matching (``MODE tome``) on x (N, B, D) laid out [CLS, n tokens].

    The whole sequence is split alternately, A = positions 0, 2, ... (CLS first), B = 1, 3, ...; CLS's
    scores are -inf, so it is never merged. The ``spec.merged(n)`` A tokens with the most similar B
    match (cosine of ``keys`` (B, N, hd), the block's keys, head mean) are merged into it, every token
    being the size-weighted mean of its members; the result is laid out [CLS, unmerged A in their
    order, B in their order] (not restored to spatial order: the next block splits this sequence).
    ``index`` (B, n): each patch token's original patch (a merged token keeps its B token's);
    ``size`` (B, N): patches each token holds. Returns the reduced x, index and size."""
    n = index.shape[1]
    r = spec.merged(n)
    if r <= 0:
        return x, index, size
    xb = x.transpose(0, 1)  # (B, N, D)
    D = xb.shape[-1]
    metric = F.normalize(keys.float(), dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # (B, |A|, |B|)
    scores[:, 0] = -math.inf  # A's first token is CLS
    best, match = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True, stable=True)
    src, unm = order[:, :r], order[:, r:].sort(dim=-1).values  # merged / unmerged A (CLS first)
    dst = match.gather(1, src)
    weighted = xb * size[..., None]
    wa, wb = weighted[:, ::2], weighted[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    wb = wb.scatter_add(1, dst[..., None].expand(-1, -1, D), wa.gather(1, src[..., None].expand(-1, -1, D)))
    sb = sb.scatter_add(1, dst, sa.gather(1, src))
    new_size = torch.cat([sa.gather(1, unm), sb], dim=1)
    tokens = torch.cat([wa.gather(1, unm[..., None].expand(-1, -1, D)), wb], dim=1) / new_size[..., None]
    full = torch.cat([index.new_full((index.shape[0], 1), -1), index], dim=1)  # -1: CLS's slot, cut below
    new_index = torch.cat([full[:, ::2].gather(1, unm), full[:, 1::2]], dim=1)[:, 1:]
    return tokens.transpose(0, 1), new_index, new_size


def _evit_tokens(x: torch.Tensor, cls_row: torch.Tensor, index: torch.Tensor, spec: PruneSpec):
    """EViT's own rule (``MODE evit``) on x (N, B, D) laid out [CLS, n tokens, fused?], where ``index``
    (B, n) covers the n tokens (FUSED_INDEX for a fused one kept earlier) and a last fused token, if
    any, follows them.

    All non-CLS tokens, the last fused one included, compete: the ``spec.kept`` with the highest CLS
    attention are kept in descending order of it and, with ``fuse``, the others become one token
    appended last, their sum weighted by their CLS attention. Returns the reduced x and the kept
    tokens' indices."""
    n = index.shape[1]
    has_fused = x.shape[0] == n + 2
    candidates = n + has_fused
    keep = spec.kept(candidates)
    if keep >= candidates:
        return x, index
    xb = x.transpose(0, 1)  # (B, N, D)
    D = xb.shape[-1]
    scores = cls_row[:, 1:]  # (B, candidates)
    if has_fused:
        index = torch.cat([index, index.new_full((index.shape[0], 1), FUSED_INDEX)], dim=1)
    top = scores.topk(keep, dim=1, largest=True, sorted=True).indices
    parts = [xb[:, :1], xb[:, 1:].gather(1, top[..., None].expand(-1, -1, D))]
    if spec.fuse:
        w = scores.scatter(1, top, 0.0)  # CLS attention of the others, 0 for the kept
        parts.append(torch.einsum("bn,bnd->bd", w, xb[:, 1:]).unsqueeze(1))
    return torch.cat(parts, dim=1).transpose(0, 1), index.gather(1, top)


def _prompt_tokens(prompt: torch.Tensor, batch: int, dtype: torch.dtype, round_fp16: bool,
                   seq_first: bool = False) -> torch.Tensor:
    """A learnable prompt (n, w) expanded to (batch, n, w), or (n, batch, w) with ``seq_first``, for
    concatenation with tokens of ``dtype``.

    ``round_fp16`` repeats what the IVLP/PromptSRC/PromptKD code does in every precision: it casts
    the expanded prompt to fp16 (``.half()``) before concatenating, so in fp32 runs the prompt's
    values are rounded to fp16 in the forward pass (``torch.cat`` promotes them back) and each
    image's gradient slice is rounded to fp16 before the slices are summed. Same operations in the
    same order, so an fp32 run equals the original's bit for bit (docs/method.md). The rounded
    prompt is cast back to ``dtype`` here rather than by ``torch.cat``'s type promotion (the same
    values and gradients), so that autocast never sees an fp16 tensor beside its own dtype."""
    p = prompt.expand(batch, -1, -1)
    if seq_first:
        p = p.permute(1, 0, 2)
    return p.half().to(dtype) if round_fp16 else p.type(dtype)


class FrozenCLIP(nn.Module):
    """Frozen CLIP with prompt-injection hooks. Holds no trainable parameter."""

    def __init__(self, clip_model: nn.Module, prune: Optional[PruneSpec] = None,
                 explicit_attention: bool = False):
        """``explicit_attention``: compute every attention through ``nn.MultiheadAttention``'s
        explicit-weights path (``need_weights=True``), as the released Spotlighter-on-PromptKD code's
        CLIP does in every block of both towers. The fused path (the default, as OpenAI's CLIP) gives
        the same values up to ~1e-7 per block; the explicit one reproduces that code bit for bit."""
        super().__init__()
        self.model = clip_model
        self.prune = prune or PruneSpec()
        self.explicit_attention = explicit_attention
        for p in self.model.parameters():
            p.requires_grad_(False)
        if self.prune.active:
            self.check_prune(self.prune)

    def check_prune(self, spec: PruneSpec) -> None:
        if not self.is_vit:
            raise BackboneError("MODEL.PRUNE drops ViT tokens: it needs a ViT backbone.")
        blocks = len(self.model.visual.transformer.resblocks)
        bad = [i for i in spec.layers if not 0 <= i < blocks - 1]
        if bad or list(spec.layers) != sorted(set(spec.layers)):
            raise BackboneError(
                f"MODEL.PRUNE.LAYERS = {list(spec.layers)} is invalid for this CLIP: expected increasing "
                f"block indices in [0, {blocks - 2}] (0-based; the last block, {blocks - 1}, gives the "
                "output tokens and cannot drop any).")

    @property
    def num_patches(self) -> int:
        v = self.model.visual
        return (self.input_resolution // v.conv1.kernel_size[0]) ** 2

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def is_vit(self) -> bool:
        return hasattr(self.model.visual, "transformer")

    @property
    def embed_dim(self) -> int:
        return self.model.text_projection.shape[1]

    @property
    def text_width(self) -> int:
        return self.model.ln_final.weight.shape[0]

    @property
    def vision_width(self) -> int:
        if not self.is_vit:
            raise BackboneError("Token-level features need a ViT backbone (ViT-B/16, ViT-B/32, ViT-L/14).")
        return self.model.visual.conv1.weight.shape[0]

    @property
    def input_resolution(self) -> int:
        return int(self.model.visual.input_resolution)

    @property
    def context_length(self) -> int:
        return int(self.model.positional_embedding.shape[0])

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def train(self, mode: bool = True):  # frozen CLIP always stays in eval mode
        return super().train(False)

    # ------------------------------------------------------------------ text
    @property
    def openclip(self):
        """The :class:`spotlighter.openclip.OpenCLIPInfo` of an OpenCLIP backbone, else None."""
        return getattr(self.model, "openclip", None)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (N, context length), cut to the context with the end-of-text token kept last:
        OpenAI's tokenizer, or OpenCLIP's for an OpenCLIP backbone."""
        if self.openclip is not None:
            return self.openclip.tokenize(texts)
        from clip import clip as clip_api

        return clip_api.tokenize(list(texts), context_length=self.context_length, truncate=True)

    def token_count(self, text: str) -> int:
        """Tokens of ``text``, start and end tokens included, before any cut to the context."""
        if self.openclip is not None:
            return self.openclip.token_count(text)
        from clip import clip as clip_api

        return len(clip_api._tokenizer.encode(text)) + 2

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens).type(self.dtype)

    def encode_text_embeddings(self, embeddings: torch.Tensor, tokenized: torch.Tensor,
                               deep_prompts: Optional[Sequence[torch.Tensor]] = None,
                               prompt_start: int = 1, round_prompts: bool = False) -> torch.Tensor:
        """Text features from token embeddings (C, L, w); ``deep_prompts[i]`` (n, w) replaces the
        ``n`` tokens after ``prompt_start`` at the input of block ``i + 1`` (MaPLe, IVLP).
        ``round_prompts``: see :func:`_prompt_tokens`."""
        m = self.model
        x = embeddings.type(self.dtype) + m.positional_embedding.type(self.dtype)
        x = x.permute(1, 0, 2)
        deep = list(deep_prompts or [])
        for i, block in enumerate(m.transformer.resblocks):
            if 1 <= i <= len(deep):
                n = deep[i - 1].shape[0]
                if round_prompts:
                    p = _prompt_tokens(deep[i - 1], x.shape[1], self.dtype, True, seq_first=True)
                else:
                    p = deep[i - 1].type(self.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)
                x = torch.cat([x[:prompt_start], p, x[prompt_start + n:]], dim=0)
            x, _ = _run_block(block, x, self.explicit_attention)
        x = x.permute(1, 0, 2)
        x = m.ln_final(x).type(self.dtype)
        eot = tokenized.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ m.text_projection

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Plain (frozen) text features of ``texts``, in batches."""
        device = self.model.positional_embedding.device
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[start:start + batch_size]).to(device)
            out.append(self.encode_text_embeddings(self.token_embedding(tokens), tokens))
        return torch.cat(out)

    # ------------------------------------------------------------------ image
    def _embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        v = self.model.visual
        x = v.conv1(images.type(self.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return x

    def _run_blocks(self, x: torch.Tensor, blocks: Sequence[nn.Module], prune: Optional[PruneSpec]):
        """Vision blocks on x (N, B, D); with an active ``prune``, reduce tokens at its layers.

        Returns x, the kept patches' original indices (B, n) or None, the per-layer kept indices
        and the patches each token holds (B, N; None unless tokens were merged)."""
        if prune is None or not prune.active:
            for block in blocks:
                x, _ = _run_block(block, x, self.explicit_attention)
            return x, None, (), None
        layers = set(prune.layers)
        index = torch.arange(x.shape[0] - 1, device=x.device).expand(x.shape[1], -1)
        kept = []
        size = None
        merging = prune.mode in MERGING_MODES
        for i, block in enumerate(blocks):
            if i not in layers:
                x = _run_block(block, x)[0] if size is None else _run_block_sized(block, x, size)[0]
                continue
            if merging:
                if size is None:
                    size = torch.ones(x.shape[1], x.shape[0], device=x.device, dtype=x.dtype)
                out, _, keys = _attention_with_cls_row(block, x, size, need_keys=True)
                if prune.mode == "merge":
                    x, index, size = _merge_tokens(x + out, keys, index, size, prune)
                else:
                    x, index, size = _tome_tokens(x + out, keys, index, size, prune)
            else:
                out, cls_row = _attention_with_cls_row(block, x)
                reduce = _drop_tokens if prune.mode == "drop" else _evit_tokens
                x, index = reduce(x + out, cls_row, index, prune)
            kept.append(index)
            x = x + block.mlp(block.ln_2(x))
        return x, index, tuple(kept), size

    def _prune_for(self, pruned: bool) -> Optional[PruneSpec]:
        return self.prune if pruned and self.prune.active else None

    def encode_image(self, images: torch.Tensor,
                     shallow_prompt: Optional[torch.Tensor] = None,
                     deep_prompts: Optional[Sequence[torch.Tensor]] = None,
                     pruned: bool = True, round_prompts: bool = False) -> torch.Tensor:
        """Global image feature; optional visual prompts appended after the patches (MaPLe, IVLP):
        ``shallow_prompt`` (n, D) before ``ln_pre``, ``deep_prompts[i]`` (n, D) replacing them at the
        input of block ``i + 1``. ``pruned``: apply :attr:`prune` (the models pass False in training
        when it says so). ``round_prompts``: see :func:`_prompt_tokens`."""
        if not self.is_vit:
            if shallow_prompt is not None or deep_prompts:
                raise BackboneError("Visual prompts need a ViT backbone.")
            return self.model.visual(images.type(self.dtype))
        v = self.model.visual
        x = self._embed_patches(images)
        prune = self._prune_for(pruned)
        if prune is not None and shallow_prompt is None:
            x, _, _, _ = self._run_blocks(v.ln_pre(x).permute(1, 0, 2), v.transformer.resblocks, prune)
            return v.ln_post(x[0]) @ v.proj
        blocks = list(v.transformer.resblocks)
        x, _, _, _ = self._prompted_blocks(x, blocks, shallow_prompt, deep_prompts, round_prompts, prune=prune)
        x = v.ln_post(x[0])
        return x @ v.proj

    def _prompted_blocks(self, x: torch.Tensor, blocks: Sequence[nn.Module],
                         shallow_prompt: Optional[torch.Tensor], deep_prompts: Optional[Sequence[torch.Tensor]],
                         round_prompts: bool, need_weights_last: bool = False,
                         prune: Optional[PruneSpec] = None):
        """Embedded patches (B, N, D) -> (``blocks``' output (N' [+ n prompts], B, D), the last block's
        head-averaged attention weights (or CLS row, after merging) or None, the kept patches' original
        indices (B, n) or None, the per-layer kept indices), with the visual prompts of
        :meth:`encode_image` appended after the patches.

        With an active ``prune`` the prompts take part in every attention (as keys holding one patch
        each, with merging) but are never dropped or merged: tokens are reduced in front of them, and
        the deep prompts still replace the last n tokens."""
        v = self.model.visual
        n_prompt = 0
        if shallow_prompt is not None:
            n_prompt = shallow_prompt.shape[0]
            if round_prompts:
                p = _prompt_tokens(shallow_prompt, x.shape[0], x.dtype, True)
            else:
                p = shallow_prompt.type(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x, p], dim=1)
        x = v.ln_pre(x).permute(1, 0, 2)
        deep = list(deep_prompts or [])
        layers = set(prune.layers) if prune is not None else set()
        index = size = None
        if layers:
            index = torch.arange(x.shape[0] - 1 - n_prompt, device=x.device).expand(x.shape[1], -1)
        kept = []
        weights = None
        for i, block in enumerate(blocks):
            if n_prompt and 1 <= i <= len(deep):
                if round_prompts:
                    p = _prompt_tokens(deep[i - 1], x.shape[1], x.dtype, True, seq_first=True)
                else:
                    p = deep[i - 1].type(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)
                x = torch.cat([x[:-n_prompt], p], dim=0)
            last = i == len(blocks) - 1
            if i in layers and not last:
                x, index, size = self._reduce_in_front_of_prompts(block, x, n_prompt, index, size, prune)
                kept.append(index)
            elif size is not None:
                x, weights = _run_block_sized(block, x, size)
            else:
                x, weights = _run_block(block, x, self.explicit_attention or (last and need_weights_last))
        return x, weights, index, tuple(kept)

    @staticmethod
    def _reduce_in_front_of_prompts(block: nn.Module, x: torch.Tensor, n_prompt: int, index: torch.Tensor,
                                    size: Optional[torch.Tensor], prune: PruneSpec):
        """One pruning block on [CLS, patches (, fused), prompts]: the attention over every token, the
        reduction of the tokens before the prompts, the MLP. Returns x, index and size (merging)."""
        body = slice(0, x.shape[0] - n_prompt)
        if prune.mode in MERGING_MODES:
            if size is None:
                size = torch.ones(x.shape[1], x.shape[0], device=x.device, dtype=x.dtype)
            out, _, keys = _attention_with_cls_row(block, x, size, need_keys=True)
            y = x + out
            merge = _merge_tokens if prune.mode == "merge" else _tome_tokens
            reduced, index, body_size = merge(y[body], keys[:, body], index, size[:, body], prune)
            size = torch.cat([body_size, size[:, body.stop:]], dim=1)
        else:
            out, cls_row = _attention_with_cls_row(block, x)
            y = x + out
            reduce = _drop_tokens if prune.mode == "drop" else _evit_tokens
            reduced, index = reduce(y[body], cls_row[:, body], index, prune)
        x = torch.cat([reduced, y[body.stop:]], dim=0)
        return x + block.mlp(block.ln_2(x)), index, size

    def encode_image_tokens(self, images: torch.Tensor, need_attn: bool = True,
                            pruned: bool = True, shallow_prompt: Optional[torch.Tensor] = None,
                            deep_prompts: Optional[Sequence[torch.Tensor]] = None,
                            round_prompts: bool = False) -> ImageTokens:
        """Global feature, projected last-block tokens and last-block CLS->patch attention.

        With pruning, ``tokens`` holds CLS and the kept patches only (a fused token, if any, takes
        part in the attention of later blocks but is not returned) and ``patch_index`` says which.
        With visual prompts (as :meth:`encode_image`; no pruning), the prompt tokens take part in every
        attention, the CLS row's softmax included, and are left out of ``tokens`` and ``cls_attn``."""
        v = self.model.visual
        if not self.is_vit:
            raise BackboneError("Token-level features need a ViT backbone (ViT-B/16, ViT-B/32, ViT-L/14).")
        if shallow_prompt is not None:
            x = self._embed_patches(images)
            blocks = list(v.transformer.resblocks)
            x, weights, index, kept = self._prompted_blocks(x, blocks, shallow_prompt, deep_prompts, round_prompts,
                                                            need_weights_last=need_attn, prune=self._prune_for(pruned))
            # ln_post and proj on every token (the prompts' included), then the prompts (and a fused
            # token, if any) dropped: the released token branch's arithmetic
            n = x.shape[0] - shallow_prompt.shape[0] if index is None else 1 + index.shape[1]
            tokens = (v.ln_post(x.permute(1, 0, 2)) @ v.proj)[:, :n]
            cls_row = weights if weights is None or weights.dim() == 2 else weights[:, 0]
            cls_attn = cls_row[:, 1:n] if need_attn else None
            return ImageTokens(global_feat=tokens[:, 0], tokens=tokens, cls_attn=cls_attn, patch_index=index,
                               kept_index=kept)
        x = v.ln_pre(self._embed_patches(images)).permute(1, 0, 2)
        blocks = list(v.transformer.resblocks)
        x, index, kept, size = self._run_blocks(x, blocks[:-1], self._prune_for(pruned))
        if size is None:
            x, weights = _run_block(blocks[-1], x, need_weights=need_attn or self.explicit_attention)
            cls_row = weights[:, 0] if need_attn else None
        else:  # merged tokens: proportional attention in the last block too
            x, cls_row = _run_block_sized(blocks[-1], x, size)
        n = x.shape[0] if index is None else 1 + index.shape[1]  # drop the fused token, if any
        tokens = v.ln_post(x[:n].permute(1, 0, 2)) @ v.proj
        cls_attn = cls_row[:, 1:n] if need_attn else None
        return ImageTokens(global_feat=tokens[:, 0], tokens=tokens, cls_attn=cls_attn, patch_index=index,
                           kept_index=kept)
