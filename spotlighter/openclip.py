"""OpenCLIP backbones (``MODEL.BACKBONE.NAME openclip:<MODEL>:<PRETRAINED_TAG>``).

An OpenCLIP model whose image tower is a ViT pooled by its class token and whose text tower is
CLIP's (causal attention, end-of-text pooling, CLIP's BPE) computes what OpenAI's CLIP computes,
up to a few settings: the MLP activation (GELU or QuickGELU), the MLP width, the vision head width,
LayerScale and an absent ``ln_pre``. :func:`load_openclip` reads the OpenCLIP weights, converts
them to the tensors of ``clip.model.CLIP`` (LayerScale folded into the projection before it) and
builds that model with those settings, so every trainer runs it through the same
:class:`~spotlighter.backbone.FrozenCLIP` as OpenAI's weights. Anything else is refused by
:func:`check_model` with the model's name and the reason.

The built model carries an :class:`OpenCLIPInfo`: the tokenizer (OpenCLIP's for that model), the
image mean/std and resolution, which :func:`adopt_input` writes into ``INPUT.*``.

``open-clip-torch`` is an optional dependency (``pip install -e '.[openclip]'``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .backbone import OFFLINE_ENV, BackboneError
from .fileio import describe_unreadable

logger = logging.getLogger(__name__)

#: ``MODEL.BACKBONE.NAME`` prefix of an OpenCLIP model.
PREFIX = "openclip:"
#: CLIP's byte-pair vocabulary: its size and the start / end-of-text ids (end = the largest id, so
#: the end-of-text position is the argmax of a tokenized prompt, as FrozenCLIP and the prompt
#: learners take it).
CLIP_VOCAB_SIZE = 49408
CLIP_SOT_ID = 49406
CLIP_EOT_ID = 49407
#: Tensors of an OpenCLIP checkpoint that FrozenCLIP does not use (SigLIP-style bias, TorchScript
#: metadata of OpenAI's archives).
IGNORED_KEYS = ("logit_bias", "input_resolution", "context_length", "vocab_size")
#: Text keys that CustomTextCLIP keeps under ``text.``.
TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
#: What fits, said with every refusal.
WHAT_FITS = ("Spotlighter runs OpenCLIP models whose image tower is OpenCLIP's VisionTransformer pooled by "
             "its class token and whose text tower is CLIP's (causal attention, end-of-text pooling, CLIP's "
             "BPE tokenizer): ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14, ViT-g-14, ViT-bigG-14 "
             "and their -quickgelu / -378 variants")
NAME_HELP = ("MODEL.BACKBONE.NAME openclip:<MODEL>:<PRETRAINED_TAG>, e.g. openclip:ViT-B-16:laion2b_s34b_b88k "
             "(`python -c \"import open_clip; print(open_clip.list_pretrained())\"` lists them); the tag may be "
             "left out when MODEL.BACKBONE.PATH names the weight file")


def is_openclip(name: str) -> bool:
    return str(name).startswith(PREFIX)


def open_clip_module():
    try:
        import open_clip
    except ImportError as exc:
        raise BackboneError(
            f"MODEL.BACKBONE.NAME names an OpenCLIP model but open_clip is not importable ({exc}). Install "
            "the optional extra: pip install -e '.[openclip]' (or pip install open-clip-torch).") from None
    return open_clip


@dataclass(frozen=True)
class OpenCLIPName:
    model: str
    tag: str = ""

    @property
    def label(self) -> str:
        return PREFIX + self.model + (f":{self.tag}" if self.tag else "")


def parse_name(name: str) -> OpenCLIPName:
    parts = str(name)[len(PREFIX):].split(":") if is_openclip(name) else []
    if len(parts) not in (1, 2) or not parts[0] or (len(parts) == 2 and not parts[1]):
        raise BackboneError(f"MODEL.BACKBONE.NAME {name!r} is not an OpenCLIP name: expected {NAME_HELP}.")
    return OpenCLIPName(parts[0], parts[1] if len(parts) == 2 else "")


def model_config(model: str) -> dict:
    """OpenCLIP's config of ``model`` (its built-in configs and those added with add_model_config)."""
    open_clip = open_clip_module()
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        import difflib

        close = difflib.get_close_matches(model, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise BackboneError(f"OpenCLIP has no model named {model!r} (MODEL.BACKBONE.NAME {PREFIX}{model}...).{hint} "
                            "`python -c \"import open_clip; print(open_clip.list_models())\"` lists them.")
    return cfg


def tag_config(name: OpenCLIPName) -> dict:
    """OpenCLIP's pretrained config of the tag ({} without one)."""
    if not name.tag:
        return {}
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(name.model, name.tag)
    if not cfg:
        tags = list_pretrained_tags_by_model(name.model)
        known = f"its tags: {', '.join(tags)}" if tags else "OpenCLIP ships no weights for it"
        raise BackboneError(f"OpenCLIP has no pretrained tag {name.tag!r} for {name.model} ({known}). For weights "
                            f"of your own set MODEL.BACKBONE.NAME {PREFIX}{name.model} and MODEL.BACKBONE.PATH "
                            "to the file.")
    return cfg


def _refusals(model: str, cfg: dict) -> List[str]:
    """Why ``model`` (OpenCLIP config ``cfg``) cannot run in FrozenCLIP; [] when it can."""
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    why = []
    if "multimodal_cfg" in cfg:
        why.append("it is a CoCa model (captioning decoder, attentional pooling)")
    if v.get("timm_model_name"):
        extra = " (SigLIP: no class token, attention-pooled)" if "siglip" in model.lower() else ""
        why.append(f"its image tower is the timm model {v['timm_model_name']!r}{extra}, not OpenCLIP's "
                   "VisionTransformer with a class token")
    elif isinstance(v.get("layers"), (list, tuple)):
        why.append("its image tower is a ResNet (ModifiedResNet): no ViT tokens")
    if v.get("attentional_pool"):
        why.append("its image tower pools with an attentional pooler, not the class token")
    if v.get("pool_type", "tok") != "tok" and not v.get("timm_model_name"):
        why.append(f"its image tower pools {v['pool_type']!r} (mean of the patch tokens), not the class token")
    for side, c in (("image", v), ("text", t)):
        custom = [k for k in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                              "scale_fc") if c.get(k)]
        if custom or c.get("block_type") == "custom":
            why.append(f"its {side} tower uses OpenCLIP's custom attention blocks ({', '.join(custom) or 'custom'})")
        for key in ("norm_kwargs", "act_kwargs"):
            if c.get(key):
                why.append(f"its {side} tower sets {key} {c[key]} (FrozenCLIP uses PyTorch's defaults)")
    for key in ("image_size", "patch_size"):
        if isinstance(v.get(key), (list, tuple)) and len(set(v[key])) > 1:
            why.append(f"its {key} {tuple(v[key])} is not square")
    if v.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):
        why.append(f"its image tower has {v['pos_embed_type']!r} position embeddings")
    if t.get("hf_model_name"):
        why.append(f"its text tower is the Hugging Face model {t['hf_model_name']!r}, not CLIP's text transformer")
    else:
        if t.get("no_causal_mask"):
            why.append("its text tower is bidirectional (no causal mask), CLIP's is causal")
        if t.get("embed_cls"):
            why.append("its text tower appends a class token (CoCa)")
        pool, eos = t.get("pool_type", "argmax"), t.get("eos_id", 2)
        if not (pool == "argmax" or (pool == "eos" and eos == CLIP_EOT_ID)):
            which = f"{pool!r} token (id {eos})" if pool == "eos" else f"{pool!r} token"
            why.append(f"its text tower pools the {which}, not CLIP's end-of-text token ({CLIP_EOT_ID})")
        if t.get("proj_bias"):
            why.append("its text projection has a bias (CLIP's is a plain matrix)")
        if t.get("proj_type", "linear") != "linear":
            why.append(f"its text projection is {t['proj_type']!r}, not CLIP's matrix")
    if t.get("hf_tokenizer_name") or "siglip" in model.lower():
        what = t.get("hf_tokenizer_name") or "SigLIP's"
        why.append(f"its tokenizer ({what}) is not CLIP's BPE")
    elif t.get("vocab_size", CLIP_VOCAB_SIZE) != CLIP_VOCAB_SIZE:
        why.append(f"its vocabulary has {t['vocab_size']} tokens, CLIP's BPE has {CLIP_VOCAB_SIZE}")
    odd = {k: val for k, val in (t.get("tokenizer_kwargs") or {}).items() if k != "clean"}
    if odd:
        why.append(f"its tokenizer is configured with {odd} (FrozenCLIP keeps every token up to end-of-text)")
    return why


def check_model(model: str, cfg: dict) -> None:
    """Raise BackboneError naming ``model`` and every reason it does not fit FrozenCLIP."""
    why = _refusals(model, cfg)
    if why:
        raise BackboneError(f"OpenCLIP model {model!r} cannot be used as a backbone: {'; '.join(why)}. "
                            f"{WHAT_FITS}.")


def _check_tag(name: OpenCLIPName, cfg: dict, tag_cfg: dict) -> None:
    """The activation the weights were trained with must be the model's: OpenCLIP only warns."""
    trained = bool(tag_cfg.get("quick_gelu", False))
    if trained != bool(cfg.get("quick_gelu", False)):
        from open_clip.pretrained import get_pretrained_cfg

        base = name.model[: -len("-quickgelu")] if name.model.endswith("-quickgelu") else name.model + "-quickgelu"
        fits = get_pretrained_cfg(base, name.tag)
        hint = (f"Use MODEL.BACKBONE.NAME {PREFIX}{base}:{name.tag}" if fits else
                f"Use the {'QuickGELU' if trained else 'GELU'} variant of {name.model}")
        raise BackboneError(
            f"The weights of OpenCLIP tag {name.tag!r} were trained with {'QuickGELU' if trained else 'GELU'}, but "
            f"model {name.model!r} uses {'GELU' if trained else 'QuickGELU'}: its features would be wrong. {hint}.")


@dataclass(frozen=True)
class Arch:
    """The shape of an OpenCLIP CLIP that FrozenCLIP runs (from its config)."""

    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    ln_pre: bool
    quick_gelu: bool
    context_length: int
    text_width: int
    text_heads: int
    text_layers: int
    text_mlp: int

    @classmethod
    def from_config(cls, cfg: dict) -> "Arch":
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        v, t = CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"])
        first = lambda x: int(x[0]) if isinstance(x, (list, tuple)) else int(x)  # noqa: E731 (square: checked)
        return cls(embed_dim=int(cfg["embed_dim"]), image_size=first(v.image_size), patch_size=first(v.patch_size),
                   vision_width=v.width, vision_layers=v.layers, vision_heads=v.width // v.head_width,
                   vision_mlp=int(v.width * v.mlp_ratio), ln_pre=not v.no_ln_pre,
                   quick_gelu=bool(cfg.get("quick_gelu", False)), context_length=t.context_length,
                   text_width=t.width, text_heads=t.heads, text_layers=t.layers, text_mlp=int(t.width * t.mlp_ratio))


@dataclass(frozen=True)
class OpenCLIPInfo:
    """What a built OpenCLIP backbone carries besides its tensors (``model.openclip``)."""

    name: OpenCLIPName
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    resolution: int
    interpolation: str
    context_length: int

    def tokenizer(self):
        return _tokenizer(self.name.model, self.context_length)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer()(list(texts), context_length=self.context_length)

    def token_count(self, text: str) -> int:
        return len(self.tokenizer().encode(text)) + 2


@functools.lru_cache(maxsize=None)
def _tokenizer(model: str, context_length: int):
    open_clip = open_clip_module()
    level = logging.root.manager.disable
    logging.disable(logging.INFO)  # open_clip logs each lookup step on the root logger
    try:
        tok = open_clip.get_tokenizer(model, context_length=context_length)
    finally:
        logging.disable(level)
    ids = (getattr(tok, "sot_token_id", None), getattr(tok, "eot_token_id", None), getattr(tok, "vocab_size", None))
    if ids != (CLIP_SOT_ID, CLIP_EOT_ID, CLIP_VOCAB_SIZE):
        raise BackboneError(f"OpenCLIP's tokenizer of {model!r} ({type(tok).__name__}) is not CLIP's BPE (start, "
                            f"end-of-text ids and vocabulary {ids}, CLIP's are "
                            f"{(CLIP_SOT_ID, CLIP_EOT_ID, CLIP_VOCAB_SIZE)}). {WHAT_FITS}.")
    return tok


def preprocess(name: OpenCLIPName, cfg: Optional[dict] = None, tag_cfg: Optional[dict] = None) -> dict:
    """The model's own image preprocessing, as OpenCLIP's create_model sets it for a built-in model:
    its defaults (OpenAI's mean and std, bicubic) overlaid with the tag's; the size is the image
    tower's."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = model_config(name.model) if cfg is None else cfg
    tag_cfg = tag_config(name) if tag_cfg is None else tag_cfg
    merged = merge_preprocess_dict(PreprocessCfg(), tag_cfg)
    size = cfg["vision_cfg"].get("image_size", 224)
    merged["size"] = int(size[0] if isinstance(size, (list, tuple)) else size)
    return merged


def describe(name: str) -> OpenCLIPInfo:
    """Check ``name`` (model fits, tag known and trained with the model's activation) and return what
    the backbone will carry, without reading any weights."""
    spec = parse_name(name)
    cfg = model_config(spec.model)
    check_model(spec.model, cfg)
    tag_cfg = tag_config(spec)
    if spec.tag:
        _check_tag(spec, cfg, tag_cfg)
    pre = preprocess(spec, cfg, tag_cfg)
    context = int(cfg["text_cfg"].get("context_length", 77))
    return OpenCLIPInfo(spec, tuple(float(x) for x in pre["mean"]), tuple(float(x) for x in pre["std"]),
                        pre["size"], str(pre["interpolation"]), context)


# ---------------------------------------------------------------------------- weights
def _hf_parts(tag_cfg: dict) -> Tuple[str, List[str]]:
    """The Hugging Face repository of a tag and the file names OpenCLIP tries there, in its order."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, filename = os.path.split(tag_cfg["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME
    names = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
    if filename != HF_WEIGHTS_NAME and filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return repo, names + [filename]


def _url_cache_file(tag_cfg: dict) -> str:
    """Where OpenCLIP keeps a tag downloaded from a URL (its default cache folder)."""
    return os.path.join(os.path.expanduser(os.path.join("~", ".cache", "clip")), os.path.basename(tag_cfg["url"]))


def cached_file(tag_cfg: dict) -> Optional[str]:
    """The tag's weight file in OpenCLIP's cache (Hugging Face's hub cache or OpenCLIP's URL cache), or None."""
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    if tag_cfg.get("hf_hub"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, names = _hf_parts(tag_cfg)
            for filename in names:
                found = try_to_load_from_cache(repo_id=repo, filename=filename)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    if tag_cfg.get("url") and os.path.isfile(_url_cache_file(tag_cfg)):
        return _url_cache_file(tag_cfg)
    return None


def _where_to_get(name: OpenCLIPName, tag_cfg: dict) -> str:
    if tag_cfg.get("hf_hub"):
        repo, names = _hf_parts(tag_cfg)
        source = f"{names[-1]} from https://huggingface.co/{repo}"
    else:
        source = f"{tag_cfg.get('url')}"
    return (f"Download {source} on a machine with internet and set MODEL.BACKBONE.PATH to the file, or fill "
            f"OpenCLIP's cache there (python -c \"import open_clip; open_clip.create_model('{name.model}', "
            f"pretrained='{name.tag}')\") and copy it to this machine (Hugging Face's cache: $HF_HOME/hub, "
            "default ~/.cache/huggingface/hub; URL downloads: ~/.cache/clip)")


#: Seconds to wait for the download host before saying it cannot be reached.
CONNECT_TIMEOUT_S = 5.0
PROXY_ENVS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _unreachable_host(tag_cfg: dict) -> Optional[str]:
    """The download host when it cannot be reached (no DNS or no connection: Hugging Face's client
    would retry for about a minute before failing), else None."""
    import socket
    from urllib.parse import urlparse

    host = ("huggingface.co" if tag_cfg.get("hf_hub") else urlparse(tag_cfg.get("url", "")).hostname) or ""
    if not host or any(os.environ.get(k) for k in PROXY_ENVS):  # through a proxy: let the download try
        return None
    if tag_cfg.get("hf_hub") and os.environ.get("HF_ENDPOINT"):
        host = urlparse(os.environ["HF_ENDPOINT"]).hostname or host
    try:
        socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT_S).close()
    except OSError:
        return host
    return None


def offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in (OFFLINE_ENV, "HF_HUB_OFFLINE"))


def resolve_file(name: OpenCLIPName, path: str = "") -> str:
    """The weight file: ``path`` (MODEL.BACKBONE.PATH), else the tag's file in OpenCLIP's cache, else
    OpenCLIP's download (unless offline)."""
    if path:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise BackboneError(f"MODEL.BACKBONE.PATH points to {path!r}, which is not a file. Give the path of the "
                                f"OpenCLIP weights of {name.label} (open_clip_model.safetensors, "
                                "open_clip_pytorch_model.bin, or a state dict saved with torch.save).")
        return path
    if not name.tag:
        tags = open_clip_module().list_pretrained_tags_by_model(name.model)
        raise BackboneError(f"MODEL.BACKBONE.NAME {name.label} names no pretrained tag and MODEL.BACKBONE.PATH is "
                            f"empty: add a tag ({', '.join(tags) or 'OpenCLIP ships none for this model'}) or set "
                            "MODEL.BACKBONE.PATH to the weight file.")
    tag_cfg = tag_config(name)
    found = cached_file(tag_cfg)
    if found:
        return found
    if offline():
        raise BackboneError(f"The weights of {name.label} are not in OpenCLIP's cache and downloads are off "
                            f"({OFFLINE_ENV} or HF_HUB_OFFLINE is set). {_where_to_get(name, tag_cfg)}.")
    host = _unreachable_host(tag_cfg)
    if host:
        raise BackboneError(f"The weights of {name.label} are not in OpenCLIP's cache and {host} cannot be reached "
                            f"from this machine. {_where_to_get(name, tag_cfg)}.")
    from open_clip.pretrained import download_pretrained

    logger.info("Downloading the OpenCLIP weights of %s", name.label)
    try:
        target = download_pretrained(tag_cfg)
    except Exception as exc:  # network and hub errors come in many types
        raise BackboneError(f"The weights of {name.label} are not in OpenCLIP's cache and could not be downloaded "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                            f"{_where_to_get(name, tag_cfg)}.") from None
    if not target or not os.path.isfile(target):
        raise BackboneError(f"OpenCLIP's download of {name.label} gave no file. {_where_to_get(name, tag_cfg)}.")
    return target


def read_weights(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from an OpenCLIP weight file: safetensors, a torch.save file (its ``state_dict``,
    DDP's ``module.`` prefixes removed) or an OpenAI TorchScript archive; only tensors are read."""
    from .backbone import _is_torchscript
    from .weights import read_torchscript_state

    fix = ("An OpenCLIP weight file is open_clip_model.safetensors / open_clip_pytorch_model.bin as OpenCLIP "
           "downloads them, or a state dict saved with torch.save(model.state_dict(), path).")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        elif _is_torchscript(path):
            state = read_torchscript_state(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"{path} cannot be read as OpenCLIP weights: it is {describe_unreadable(path, exc)}. "
                            f"{fix}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors. {fix}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def convert_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """OpenCLIP tensors -> ``clip.model.CLIP`` tensors (float32): CustomTextCLIP's ``text.`` prefix
    dropped, LayerScale folded into the projection it scales (``ls_1`` into ``attn.out_proj``,
    ``ls_2`` into ``mlp.c_proj``: (Wx + b) * g = (g W) x + g b), ``logit_scale`` a scalar."""
    out = {}
    for k, v in state.items():
        if k in IGNORED_KEYS:
            continue
        if k.startswith("text.") and k[len("text."):].startswith(TEXT_KEYS):
            k = k[len("text."):]
        out[k] = v.float()
    for key in [k for k in out if k.endswith((".ls_1.gamma", ".ls_2.gamma"))]:
        block = key.rsplit(".", 2)[0]
        target = f"{block}.attn.out_proj" if key.endswith("ls_1.gamma") else f"{block}.mlp.c_proj"
        if f"{target}.weight" not in out or f"{target}.bias" not in out:
            continue  # left in: the file is named as not holding the model
        gamma = out.pop(key)
        out[f"{target}.weight"] = out[f"{target}.weight"] * gamma[:, None]
        out[f"{target}.bias"] = out[f"{target}.bias"] * gamma
    if "logit_scale" in out:
        out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def _mlp(width: int, hidden: int, quick_gelu: bool) -> nn.Sequential:
    from clip.model import QuickGELU

    return nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)),
                                      ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
                                      ("c_proj", nn.Linear(hidden, width))]))


def build_shell(arch: Arch) -> nn.Module:
    """``clip.model.CLIP`` of ``arch`` with its weights on the meta device (no memory, no init cost)."""
    from clip.model import CLIP, VisionTransformer

    with torch.device("meta"):
        model = CLIP(arch.embed_dim, arch.image_size, arch.vision_layers, arch.vision_width, arch.patch_size,
                     arch.context_length, CLIP_VOCAB_SIZE, arch.text_width, arch.text_heads, arch.text_layers)
        if arch.vision_heads != arch.vision_width // 64:
            model.visual = VisionTransformer(arch.image_size, arch.patch_size, arch.vision_width, arch.vision_layers,
                                             arch.vision_heads, arch.embed_dim)
        for blocks, width, hidden in ((model.visual.transformer.resblocks, arch.vision_width, arch.vision_mlp),
                                      (model.transformer.resblocks, arch.text_width, arch.text_mlp)):
            for block in blocks:
                block.mlp = _mlp(width, hidden, arch.quick_gelu)
        if not arch.ln_pre:
            model.visual.ln_pre = nn.Identity()
    return model


def build(state: Dict[str, torch.Tensor], arch: Arch, info: OpenCLIPInfo, source: str,
          device="cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The frozen ``clip.model.CLIP`` (eval mode, on ``device``, in ``dtype`` as
    :func:`spotlighter.backbone.build_clip` makes it) holding the converted ``state``."""
    from clip.model import convert_weights

    from .backbone import CLIP_DTYPES

    if dtype not in CLIP_DTYPES:
        raise BackboneError(f"CLIP can be built in {', '.join(map(str, CLIP_DTYPES))}; got {dtype}.")
    model = build_shell(arch)
    tensors = convert_state(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", wrong)) if keys]
        raise BackboneError(f"{source} does not hold the weights of OpenCLIP model {info.name.model!r} "
                            f"({'; '.join(parts)}). Give the file of that model (or name the model the file holds).")
    model.load_state_dict(tensors, assign=True)
    causal = torch.full(  # CLIP's causal mask (the shell's is on the meta device)
        (arch.context_length, arch.context_length), float("-inf")).triu_(1)
    for block in model.transformer.resblocks:
        block.attn_mask = causal
    model.openclip = info
    if dtype == torch.float16:
        convert_weights(model)
    model = model.to(device=device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_openclip(name: str, path: str = "", device="cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """``clip.model.CLIP`` holding the OpenCLIP model ``name`` (``openclip:<MODEL>[:<TAG>]``), its weights
    from ``path`` or OpenCLIP's cache (downloaded where the machine can)."""
    info = describe(name)
    cfg = model_config(info.name.model)
    info.tokenizer()  # a tokenizer that is not CLIP's BPE is refused before any weights are read
    file = resolve_file(info.name, path)
    model = build(read_weights(file), Arch.from_config(cfg), info, file, device, dtype)
    logger.info("OpenCLIP %s from %s: %s, %d px, mean %s, std %s", info.name.label, file,
                "QuickGELU" if cfg.get("quick_gelu") else "GELU", info.resolution, info.mean, info.std)
    return model


# ---------------------------------------------------------------------------- config
#: The image mean and std OpenAI's CLIP was trained with (OpenCLIP's default too).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def image_preprocessing(clip) -> Tuple[int, Tuple[float, ...], Tuple[float, ...]]:
    """(resolution, mean, std) a FrozenCLIP expects its images in: an OpenCLIP model's own, else
    OpenAI's mean and std at the model's resolution."""
    info = clip.openclip
    if info is None:
        return clip.input_resolution, OPENAI_MEAN, OPENAI_STD
    return info.resolution, info.mean, info.std


def check_same_images(student, teacher, student_name: str, teacher_name: str) -> Optional[str]:
    """A message when a teacher CLIP expects other images than the student (PromptKD gives both the
    same batch), else None."""
    a, b = image_preprocessing(student), image_preprocessing(teacher)
    if a == b:
        return None
    say = lambda p: f"{p[0]} px, mean {tuple(p[1])}, std {tuple(p[2])}"  # noqa: E731
    return (f"the teacher's CLIP {teacher_name} expects images at {say(b)}; the student's {student_name} at "
            f"{say(a)}. PromptKD gives both the same images: choose a teacher (TRAINER.PROMPTKD.TEACHER_NAME) "
            "with the student's resolution and normalisation.")


#: The INPUT keys an OpenCLIP backbone sets from its own preprocessing.
INPUT_KEYS = ("SIZE", "PIXEL_MEAN", "PIXEL_STD", "INTERPOLATION")
DASSL_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def input_values(info: OpenCLIPInfo) -> dict:
    interpolation = info.interpolation if info.interpolation in DASSL_INTERPOLATIONS else "bicubic"
    return {"SIZE": (info.resolution, info.resolution), "PIXEL_MEAN": list(info.mean), "PIXEL_STD": list(info.std),
            "INTERPOLATION": interpolation}


def adopt_input(cfg) -> List[str]:
    """With an OpenCLIP ``MODEL.BACKBONE.NAME``, set ``INPUT.SIZE``, ``PIXEL_MEAN``, ``PIXEL_STD`` and
    ``INTERPOLATION`` to the model's own (the trainer configs carry OpenAI's); returns what changed.
    ``cfg`` must not be frozen. Names that do not fit are refused here, before any data is read."""
    name = cfg.MODEL.BACKBONE.NAME
    if not is_openclip(name):
        return []
    changed = []
    for key, value in input_values(describe(name)).items():
        old = cfg.INPUT[key]
        same = (list(old) == list(value)) if isinstance(value, (list, tuple)) else old == value
        if not same:
            changed.append(f"INPUT.{key} {tuple(old) if isinstance(old, (list, tuple)) else old} -> "
                           f"{tuple(value) if isinstance(value, (list, tuple)) else value}")
            cfg.INPUT[key] = type(old)(value) if isinstance(old, (list, tuple)) else value
    return changed


def check_input(cfg, info: OpenCLIPInfo) -> Optional[str]:
    """A message when ``cfg.INPUT`` normalises images otherwise than the model (None when it matches)."""
    want = input_values(info)
    bad = [f"INPUT.{k} = {list(cfg.INPUT[k])} (the model's: {want[k]})" for k in ("PIXEL_MEAN", "PIXEL_STD")
           if [round(float(x), 8) for x in cfg.INPUT[k]] != [round(float(x), 8) for x in want[k]]]
    if not bad:
        return None
    return (f"{'; '.join(bad)} for {info.name.label}: the images would be normalised otherwise than the model was "
            f"trained. Set {' and '.join(b.split(' = ')[0] for b in bad)} to the model's values (train.py does).")
