"""Fitted parameters on disk: msgpack via flax.serialization, never pickle."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flax import serialization

from e6score_dagster.model.config import ModelConfig
from e6score_dagster.model.data import FeatureLayout
from e6score_dagster.model.network import LINK_KNOTS, interaction_rows, scale_feature_count

FORMAT = 1
MAX_PARAMS_BYTES = 1 << 30  # a params file is tens of MB; refuse anything absurd


@dataclass
class Fitted:
    params: dict
    config: ModelConfig
    layout: FeatureLayout
    meta: dict = field(default_factory=dict)
    # Cross-fitting: fold_params[k] was fitted without fold k (`data.fold_of`) and scores it.
    # Empty: `params` scores every post.
    fold_params: list[dict] = field(default_factory=list)


def save_params(path: Path, fitted: Fitted) -> None:
    """Write to a temporary name and rename, so a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = serialization.msgpack_serialize(
        {
            "format": FORMAT,
            "config": fitted.config.to_dict(),
            "layout": fitted.layout.to_dict(),
            "meta": fitted.meta,
            "params": serialization.to_state_dict(fitted.params),
            "fold_params": [serialization.to_state_dict(p) for p in fitted.fold_params],
        }
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_params(path: Path) -> Fitted:
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ValueError(f"{path} is {size} bytes, over the {MAX_PARAMS_BYTES}-byte limit")
    state = serialization.msgpack_restore(path.read_bytes())
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an E6Score params file (format {FORMAT})")
    layout = FeatureLayout.from_dict(state["layout"])
    return Fitted(
        params=_upgrade(state["params"], layout),
        config=ModelConfig.from_dict(state["config"]),
        layout=layout,
        meta=dict(state.get("meta") or {}),
        fold_params=[_upgrade(p, layout) for p in _as_list(state.get("fold_params"))],
    )


def _upgrade(params: dict, layout: FeatureLayout) -> dict:
    """Params written before the models had the additive scale correction, the link, the tag
    interactions or the tags' spread predict without them: zero `scale`, `link`,
    `interactions` or tag variance weights say exactly that."""
    width = scale_feature_count(layout.n_rating, layout.n_ext)
    if ("tag_weight" in params or "head" in params) and "scale" not in params:
        params = {**params, "scale": {"kernel": np.zeros((width, 1), np.float32)}}
    kernel = np.asarray(params["scale"]["kernel"]) if "scale" in params else None
    if kernel is not None and len(kernel) < width:  # before the spread and long tail's
        pad = np.zeros((width - len(kernel), 1))
        params = {**params, "scale": {"kernel": np.concatenate([kernel, pad]).astype(np.float32)}}
    if "tag_weight" in params and "tag_variance" not in params:
        params = {**params, "tag_variance": np.zeros_like(np.asarray(params["tag_weight"]))}
    if "head" in params and "variance" not in params["tags"]:
        tags = {**params["tags"], "variance": np.zeros_like(np.asarray(params["tags"]["bias"]))}
        params = {**params, "tags": tags}
    if ("tag_weight" in params or "head" in params) and "link" not in params:
        params = {**params, "link": {"kernel": np.zeros((len(LINK_KNOTS), 1), np.float32)}}
    if ("tag_weight" in params or "head" in params) and "interactions" not in params:
        n_dense = int(layout.extra.get("dense_tags", 0))
        size = max(interaction_rows(n_dense, layout.n_rating), 1)
        params = {**params, "interactions": {"weight": np.zeros(size, np.float32)}}
    return params


def _as_list(value) -> list[dict]:
    """msgpack_restore turns a list of dicts into a dict keyed "0", "1", ...: undo that."""
    if not value:
        return []
    if isinstance(value, dict):
        return [value[k] for k in sorted(value, key=int)]
    return list(value)
