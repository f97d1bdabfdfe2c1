"""Training loop: one jitted step over fixed-shape streamed batches, one-cycle Adam."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

from e6score_dagster.model.config import ModelConfig
from e6score_dagster.model.data import Batch, FeatureLayout, ParquetBatches
from e6score_dagster.model.metrics import predictive_metrics
from e6score_dagster.model.network import E6ScoreNet, LinearNet, gaussian_nll

MODEL_INPUTS = ("tags", "rating", "ext", "numeric", "t_years")
Log = Callable[[str], None]


ARCHITECTURES = {"e6score": E6ScoreNet, "linear": LinearNet}


def make_model(config: ModelConfig, layout: FeatureLayout) -> E6ScoreNet | LinearNet:
    if config.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {config.architecture!r}")
    return ARCHITECTURES[config.architecture](
        config=config,
        n_rating=layout.n_rating,
        n_ext=layout.n_ext,
        y_mean=layout.y_mean,
        y_std=layout.y_std,
    )


def model_inputs(batch: Batch) -> dict[str, np.ndarray]:
    return {k: batch[k] for k in MODEL_INPUTS}


def init_params(config: ModelConfig, layout: FeatureLayout) -> dict:
    b = 2
    dummy = {
        "tags": np.zeros((b, layout.max_tags), np.int32),
        "rating": np.zeros(b, np.int32),
        "ext": np.zeros(b, np.int32),
        "numeric": np.zeros((b, len(layout.numeric)), np.float32),
        "t_years": np.zeros(b, np.float32),
    }
    return make_model(config, layout).init(jax.random.PRNGKey(config.seed), dummy)["params"]


@dataclass
class TrainResult:
    params: dict
    steps: int
    seconds: float
    data_wait_seconds: float
    posts_per_second: float
    history: list[dict] = field(default_factory=list)  # {"step", "epoch", "loss"}


class NonFiniteLossError(FloatingPointError):
    pass


def train(
    config: ModelConfig,
    layout: FeatureLayout,
    data: ParquetBatches,
    log: Log = print,
    log_every_s: float = 10.0,
) -> TrainResult:
    model = make_model(config, layout)
    steps_per_epoch = data.steps()
    if steps_per_epoch == 0:
        raise ValueError("no training rows in the feature matrix")
    total = config.epochs * steps_per_epoch
    schedule = optax.cosine_onecycle_schedule(
        transition_steps=total, peak_value=config.learning_rate, pct_start=0.25
    )
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, weight_decay=config.weight_decay),
    )
    params = init_params(config, layout)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            mu, sigma = model.apply({"params": p}, model_inputs(batch))
            w = batch["weight"]
            return (gaussian_nll(mu, sigma, batch["y"]) * w).sum() / jnp.maximum(w.sum(), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    log(
        f"training: {data.num_rows():,} posts, {config.epochs} epochs x {steps_per_epoch} steps "
        f"of {config.batch_size}"
    )
    history: list[dict] = []
    t_start = time.perf_counter()
    t_log = t_start
    running, n_running, global_step = 0.0, 0, 0
    record_every = max(1, total // 200)
    for epoch in range(config.epochs):
        for batch in data.epoch(epoch):
            jbatch = {k: batch[k] for k in (*MODEL_INPUTS, "y", "weight")}
            params, opt_state, loss = step(params, opt_state, jbatch)
            loss_v = float(loss)
            global_step += 1
            if not math.isfinite(loss_v):
                raise NonFiniteLossError(
                    f"training loss became {loss_v} at step {global_step} (epoch {epoch + 1}); "
                    "params were not saved"
                )
            running += loss_v
            n_running += 1
            if global_step % record_every == 0 or global_step == total:
                history.append({"step": global_step, "epoch": epoch, "loss": running / n_running})
            now = time.perf_counter()
            if now - t_log >= log_every_s or global_step == total:
                elapsed = now - t_start
                rate = global_step * config.batch_size / elapsed
                eta = (total - global_step) * elapsed / global_step
                log(
                    f"step {global_step}/{total} epoch {epoch + 1} loss {running / n_running:.4f} "
                    f"{rate:,.0f} posts/s, data wait {data.wait_seconds / elapsed:.0%}, "
                    f"ETA {eta:.0f}s"
                )
                t_log = now
            if global_step % record_every == 0:
                running, n_running = 0.0, 0
    seconds = time.perf_counter() - t_start
    return TrainResult(
        params=jax.device_get(params),
        steps=global_step,
        seconds=seconds,
        data_wait_seconds=data.wait_seconds,
        posts_per_second=global_step * config.batch_size / seconds,
        history=history,
    )


def predict(
    config: ModelConfig, layout: FeatureLayout, params: dict, data: ParquetBatches
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, mu, sigma) for every real row of `data`, in batches."""
    model = make_model(config, layout)

    @jax.jit
    def fwd(params, batch):
        return model.apply({"params": params}, batch)

    ys, mus, sigmas = [], [], []
    for batch in data.epoch(0):
        real = batch["weight"] > 0
        mu, sigma = fwd(params, model_inputs(batch))
        ys.append(batch["y"][real])
        mus.append(np.asarray(mu)[real])
        sigmas.append(np.asarray(sigma)[real])
    if not ys:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return np.concatenate(ys), np.concatenate(mus), np.concatenate(sigmas)


def evaluate(
    config: ModelConfig, layout: FeatureLayout, params: dict, data: ParquetBatches
) -> dict[str, float]:
    return metrics_with_constant(*predict(config, layout, params, data), layout)


def metrics_with_constant(
    y: np.ndarray, mu: np.ndarray, sigma: np.ndarray, layout: FeatureLayout
) -> dict[str, float]:
    """Held-out metrics of the model, and of a constant log-normal fitted to the training
    posts (keys prefixed `constant_`)."""
    if y.size == 0:
        return {"n": 0}
    constant = predictive_metrics(y, np.full_like(y, layout.y_mean), np.full_like(y, layout.y_std))
    return {
        **predictive_metrics(y, mu, sigma),
        **{f"constant_{k}": v for k, v in constant.items() if k != "n"},
    }
