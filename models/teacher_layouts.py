"""Teacher checkpoints as users find them: layouts of the common SSL codebases mapped to a timm backbone.

Each layout turns the object read from the file into a flat backbone state dict (or says it does not
apply); projection heads, predictors, prototypes and momentum encoders are dropped. ``auto`` tries every
layout and keeps the one whose keys match the backbone exactly.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]
# Classifier / SSL-head keys a backbone built with num_classes=0 never has.
_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "head_dist.")
_WRAPPER_KEYS = ("state_dict", "model", "module", "network")


def _is_flat(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any) -> Mapping[str, Any] | None:
    """The flat tensor mapping inside common wrappers ({"state_dict": ...}, {"model": ...})."""
    for _ in range(3):
        if _is_flat(obj):
            return obj
        if not isinstance(obj, Mapping):
            return None
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return None
        obj = inner
    return obj if _is_flat(obj) else None


def _strip(sd: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], drop: tuple[str, ...] = ()) -> StateDict | None:
    """Keys under the first prefix that occurs, with the prefix removed; None when none occurs."""
    for prefix in prefixes:
        out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if out:
            return {k: v for k, v in out.items() if not k.startswith(drop)}
    return None


def _plain(obj: Any) -> StateDict | None:  # timm / torchvision / BYOL or SimCLR converted to torchvision
    sd = _unwrap(obj)
    return None if sd is None else dict(sd)


def _moco(obj: Any) -> StateDict | None:  # MoCo v1/v2: encoder_q, projection MLP in fc; encoder_k ignored
    sd = _unwrap(obj)
    return None if sd is None else _strip(sd, ("module.encoder_q.", "encoder_q."), drop=("fc.",))


def _mocov3(obj: Any) -> StateDict | None:  # MoCo v3: base_encoder (+ projector in fc/head), predictor ignored
    sd = _unwrap(obj)
    return None if sd is None else _strip(sd, ("module.base_encoder.", "base_encoder."), drop=("fc.", "head."))


def _swav(obj: Any) -> StateDict | None:  # SwAV: module. prefix, projection_head and prototypes dropped
    sd = _unwrap(obj)
    if sd is None:
        return None
    return _strip(sd, ("module.",), drop=("projection_head.", "prototypes."))


def _dino(obj: Any) -> StateDict | None:  # DINO: {"teacher"|"student": {"[module.]backbone.…", "[module.]head.…"}}
    if not isinstance(obj, Mapping):
        return None
    for part in ("teacher", "student"):
        sd = obj.get(part)
        if _is_flat(sd):
            out = _strip(sd, ("module.backbone.", "backbone."))  # type: ignore[arg-type]
            if out is not None:
                return out
    sd = _unwrap(obj)
    return None if sd is None else _strip(sd, ("module.backbone.", "backbone."))


LAYOUTS: dict[str, Callable[[Any], StateDict | None]] = {
    "plain": _plain, "moco": _moco, "mocov3": _mocov3, "swav": _swav, "dino": _dino,
}


def adapt(obj: Any, own_keys: set[str], layout: str = "auto") -> tuple[StateDict | None, str, list[tuple[str, list[str], list[str]]]]:
    """(state dict, layout used, [(layout, missing, unexpected) of every candidate that did not match])."""
    names = list(LAYOUTS) if layout == "auto" else [layout]
    tried: list[tuple[str, list[str], list[str]]] = []
    for name in names:
        sd = LAYOUTS[name](obj)
        if sd is None:
            continue
        sd = {k: v for k, v in sd.items() if k in own_keys or not k.startswith(_HEAD_PREFIXES)}
        missing = sorted(k for k in own_keys if k not in sd)
        unexpected = sorted(k for k in sd if k not in own_keys)
        if not missing and not unexpected:
            return sd, name, tried
        tried.append((name, missing, unexpected))
    return None, "", tried
