"""Hyper-parameters of one fit; their hash is part of the params' identity."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    epochs: int = 1  # at most; early stopping on the validation slice decides
    min_steps: int = 0
    batch_size: int = 2048
    learning_rate: float = 3e-3
    # AdamW's decoupled decay. Adam moves a rare tag's weight as fast as a common one's, so
    # with little decay the tag effects over-fit within tens of steps (held-out NLL near the
    # constant's in heavy_tails). Chosen on the worlds classic, heavy_tails and interactions at
    # 100k posts from 1e-4, 0.1, 1, 3, 10 (linear fit, held-out NLL: 1 best in all three;
    # uploaders confirms, long_tail is unchanged); see benchmarks/QUALITY.md.
    weight_decay: float = 1.0
    embed_dim: int = 16
    hash_bits: int = 17  # 2**17 embedding rows shared by all tags through the probes
    num_probes: int = 2
    cross_layers: int = 2
    mlp_widths: tuple[int, ...] = (128, 64)
    time_frequencies: int = 6
    tag_dropout: float = 0.0  # share of a post's tags hidden from the deep part per step
    grad_clip: float = 1.0
    seed: int = 0
    # Early stopping: the validation slice is scored `evals_per_epoch` times per epoch and the
    # best params are kept; training stops after `patience` scorings without improvement. Ten
    # scorings an epoch let a deep stage that only gets worse on top of the exact additive fit
    # (most worlds) stop within a third of its epoch instead of running it all.
    validation_fraction: float = 0.05
    min_validation_posts: int = 0  # small dumps: a larger share (`select.validation_fraction`)
    evals_per_epoch: int = 10
    patience: int = 3
    architecture: str = "e6score"  # "linear": the baseline; "additive": the model's first stage
    # Additive fits (the linear baseline; the model's additive stage, which adds per-category
    # shrinkage of tag effects) run for `baseline_epochs`, or more on small data to reach
    # `baseline_min_steps`. With `warm_start` the model's deep part then starts from the
    # additive stage and learns only what is not additive; without it the whole model is
    # fitted from scratch.
    baseline_epochs: int = 1
    baseline_min_steps: int = 1200
    warm_start: bool = True
    # How the additive candidates are fitted: "ridge" solves them exactly with prior scales
    # per tag group set by the evidence (`ridge.py`, at most `evidence_rounds` solves);
    # "sgd" trains them like the deep stage (AdamW, early stopping; the weight decay above).
    additive_solver: str = "ridge"
    evidence_rounds: int = 8
    # Model selection and cross-fitting (`select.select_and_crossfit`): the candidates are
    # fitted on every fold but fold 0 and the one with the best validation NLL is refitted
    # without each other fold; every post is scored by the model that never saw it. K = 5 by
    # measurement (benchmarks/folds.py, 100k posts, hold-out NLL / seconds): heavy_tails
    # 1.6106 / 12.2 at K = 3, 1.5985 / 12.9 at 5, 1.5905 / 21.6 at 10; classic 1.4589 / 10.7,
    # 1.4496 / 11.5, 1.4448 / 22.0. Each fold's model sees (K - 1) / K of the posts.
    candidates: tuple[str, ...] = ("constant", "linear", "additive", "deep")
    folds: int = 5

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mlp_widths"] = list(self.mlp_widths)
        d["candidates"] = list(self.candidates)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        if "mlp_widths" in kw:
            kw["mlp_widths"] = tuple(int(w) for w in kw["mlp_widths"])
        if "candidates" in kw:
            kw["candidates"] = tuple(str(c) for c in kw["candidates"])
        return cls(**kw)

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
