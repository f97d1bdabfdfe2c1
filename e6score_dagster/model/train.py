"""Training loop: one jitted step over fixed-shape streamed batches, one-cycle Adam."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from e6score_dagster.memory import release_memory
from e6score_dagster.model.config import ModelConfig
from e6score_dagster.model.data import Batch, FeatureLayout, ParquetBatches
from e6score_dagster.model.metrics import predictive_metrics
from e6score_dagster.model.network import (
    WARM_FROZEN,
    E6ScoreNet,
    LinearNet,
    gaussian_nll,
    warm_start,
)
from e6score_dagster.model.sparse_ops import on_accelerator

MIN_EVAL_STEPS = 25
MODEL_INPUTS = ("tags", "rating", "ext", "numeric", "t_years")
Log = Callable[[str], None]
# Optimiser steps fused into one dispatch (`lax.scan`); the host reads the losses once per chunk.
CHUNK_STEPS = 32
# Training rows are kept resident on an accelerator up to this size (they are gathered there
# without a transfer per batch); larger row sets stream from the Parquet file in chunks of
# CHUNK_STEPS batches. On a CPU, resident rows save nothing: at 1M posts the deep stage took
# 12.6 s resident and 12.7 s streamed, and the resident copy raised the step's peak by 0.44 GB.
# So a CPU keeps only small row sets (about 200k posts) resident.
RESIDENT_MAX_BYTES = 1_500_000_000
CPU_RESIDENT_MAX_BYTES = 100_000_000
# The batch-size rule: learning rates and step budgets in ModelConfig are stated for batches of
# REFERENCE_BATCH posts. A batch of B posts trains at learning_rate * sqrt(B / REFERENCE_BATCH)
# (the square-root rule for Adam) and its step budgets (`min_steps`) shrink by REFERENCE_BATCH / B,
# so every batch size sees the same number of posts.
REFERENCE_BATCH = 2048
PREDICT_BATCH = 8192
# Slices of a prediction queued at once: JAX dispatches asynchronously, and with every slice
# queued each held its inputs and the deep forward's temporaries together (1 GB of the 6M
# fit's peak on a CPU for 200k validation posts). A few keep the device busy.
PREDICT_IN_FLIGHT = 2
# Rows scored more than once (a validation or hold-out slice, by every candidate) are loaded
# once and kept up to this size; larger sets stream.
RESIDENT_PREDICT_BYTES = 256_000_000


ARCHITECTURES = {
    "e6score": (E6ScoreNet, {}),
    "linear": (LinearNet, {}),
    "additive": (LinearNet, {"shrinkage": True}),
    "constant": (LinearNet, {}),  # a LinearNet at its (all-zero) initial params
}


def make_model(config: ModelConfig, layout: FeatureLayout) -> E6ScoreNet | LinearNet:
    if config.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {config.architecture!r}")
    cls, extra = ARCHITECTURES[config.architecture]
    return cls(
        config=config,
        n_rating=layout.n_rating,
        n_ext=layout.n_ext,
        y_mean=layout.y_mean,
        y_std=layout.y_std,
        n_dense=int(layout.extra.get("dense_tags", 0)),
        **extra,
    )


def model_inputs(batch: Batch) -> dict[str, np.ndarray]:
    return {k: batch[k] for k in MODEL_INPUTS}


def _zero_batch(layout: FeatureLayout, b: int) -> Batch:
    """A batch of `b` all-zero posts with the layout's shapes (for init and compilation)."""
    return {
        "tags": np.zeros((b, layout.max_tags), np.int32),
        "rating": np.zeros(b, np.int32),
        "ext": np.zeros(b, np.int32),
        "numeric": np.zeros((b, len(layout.numeric)), np.float32),
        "t_years": np.zeros(b, np.float32),
        "y": np.zeros(b, np.float32),
        "weight": np.ones(b, np.float32),
    }


_INIT_CACHE: dict[tuple[str, str], dict] = {}


def _model_key(config: ModelConfig, layout: FeatureLayout) -> tuple[str, str]:
    return config.fingerprint(), json.dumps(layout.to_dict(), sort_keys=True)


def init_params(config: ModelConfig, layout: FeatureLayout) -> dict:
    """The model's initial params (a fresh tree each call). Initialised once per config and
    layout in one compiled program: flax's eager `init` compiled op by op, about 3 s a call."""
    key = _model_key(config, layout)
    if key not in _INIT_CACHE:
        if len(_INIT_CACHE) >= 16:
            _INIT_CACHE.clear()
        dummy = model_inputs(_zero_batch(layout, 2))
        init = jax.jit(make_model(config, layout).init)
        _INIT_CACHE[key] = init(jax.random.PRNGKey(config.seed), dummy)["params"]
    return jax.tree_util.tree_map(lambda x: x, _INIT_CACHE[key])


@dataclass
class TrainResult:
    params: dict
    steps: int
    seconds: float  # optimisation only; scoring the validation slice is in eval_seconds
    data_wait_seconds: float
    posts_per_second: float
    history: list[dict] = field(default_factory=list)  # {"step", "epoch", "loss"}
    validation: list[dict] = field(default_factory=list)  # {"step", "nll"}
    best_step: int = 0
    sigma_calibration: float = 1.0  # the factor fitted on the validation slice
    eval_seconds: float = 0.0
    device: str = ""  # what JAX ran it on, e.g. "cpu" or "NVIDIA H200"
    # The exact (ridge) fits: each tag group's prior precision, for warm starts and reports.
    prior_precision: dict[int, float] = field(default_factory=dict)
    prior_tail_dof: float = 0.0  # their Student-t prior's degrees of freedom (0: Gaussian)
    prior_sd: dict[str, float] = field(default_factory=dict)  # per group, in log1p(favs)


class NonFiniteLossError(FloatingPointError):
    pass


def device_name() -> str:
    """The accelerator JAX chose (a GPU whenever a CUDA build sees one), else "cpu"."""
    dev = jax.devices()[0]
    return "cpu" if dev.platform == "cpu" else f"{dev.platform}: {dev.device_kind}"


def scaled_learning_rate(config: ModelConfig) -> float:
    """The batch-size rule's learning rate (see REFERENCE_BATCH)."""
    return config.learning_rate * math.sqrt(config.batch_size / REFERENCE_BATCH)


def scaled_min_steps(config: ModelConfig) -> int:
    """`min_steps` counts steps of REFERENCE_BATCH posts: the same number of posts at any batch."""
    return -(-config.min_steps * REFERENCE_BATCH // config.batch_size)


def _optimizer(
    config: ModelConfig, total_steps: int, frozen: tuple[tuple[str, ...], ...] = ()
) -> optax.GradientTransformation:
    """One-cycle AdamW; parameters under a `frozen` path prefix are never updated."""
    schedule = optax.cosine_onecycle_schedule(
        transition_steps=total_steps, peak_value=scaled_learning_rate(config), pct_start=0.25
    )
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, weight_decay=config.weight_decay),
    )
    if not frozen:
        return tx

    def labels(params):
        def label(path, _):
            keys = tuple(getattr(k, "key", str(k)) for k in path)
            return "frozen" if any(keys[: len(f)] == f for f in frozen) else "train"

        return jax.tree_util.tree_map_with_path(label, params)

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _loss_fn(model: E6ScoreNet | LinearNet) -> Callable:
    def loss(params, batch, rng):
        mu, sigma = model.apply(
            {"params": params}, model_inputs(batch), train=True, rngs={"dropout": rng}
        )
        w = batch["weight"]
        return (gaussian_nll(mu, sigma, batch["y"]) * w).sum() / jnp.maximum(w.sum(), 1.0)

    return loss


def _train_step(model: E6ScoreNet | LinearNet, tx: optax.GradientTransformation) -> Callable:
    """One optimiser step on one batch (the unit whose FLOPs are counted)."""
    grad = jax.value_and_grad(_loss_fn(model))

    @jax.jit
    def step(params, opt_state, batch, rng):
        loss, grads = grad(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _chunk_runner(
    model: E6ScoreNet | LinearNet, tx: optax.GradientTransformation, dropout_key: jax.Array
) -> Callable:
    """Several optimiser steps in one dispatch: a `lax.scan` over rows of `idx`, each step
    gathering its batch from the resident `rows` on the device. Steps with `valid` False (the
    padding of a short chunk) leave params and optimiser state untouched."""
    grad = jax.value_and_grad(_loss_fn(model))

    @jax.jit
    def run(params, opt_state, rows, idx, weight, valid, step0):
        def body(carry, xs):
            params, opt_state = carry
            i, w, ok, s = xs
            batch = {k: rows[k][i] for k in (*MODEL_INPUTS, "y")} | {"weight": w}
            loss, grads = grad(params, batch, jax.random.fold_in(dropout_key, s))
            updates, new_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            keep = partial(jnp.where, ok)
            return (
                jax.tree_util.tree_map(keep, new_params, params),
                jax.tree_util.tree_map(keep, new_state, opt_state),
            ), loss

        steps = step0 + jnp.arange(idx.shape[0])
        (params, opt_state), losses = jax.lax.scan(
            body, (params, opt_state), (idx, weight, valid, steps)
        )
        return params, opt_state, losses

    return run


def train_step_flops(config: ModelConfig, layout: FeatureLayout) -> float:
    """XLA's count of floating-point operations in one training step (forward, backward and
    optimiser update) at the configured batch size."""
    model = make_model(config, layout)
    tx = _optimizer(config, 1)
    params = init_params(config, layout)
    batch = _zero_batch(layout, config.batch_size)
    key = jax.random.PRNGKey(0)
    compiled = _train_step(model, tx).lower(params, tx.init(params), batch, key).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def _forward(model: E6ScoreNet | LinearNet) -> Callable:
    return jax.jit(lambda params, batch: model.apply({"params": params}, batch))


_FORWARDS: dict[tuple[str, str], Callable] = {}


def forward_for(config: ModelConfig, layout: FeatureLayout) -> Callable:
    """The jitted forward pass of `config`'s model, one per (config, layout): every candidate's
    validation, hold-out and calibration scorings share its compilation."""
    key = _model_key(config, layout)
    if key not in _FORWARDS:
        if len(_FORWARDS) >= 16:
            _FORWARDS.clear()
        _FORWARDS[key] = _forward(make_model(config, layout))
    return _FORWARDS[key]


def _predict(fwd: Callable, params: dict, data: ParquetBatches) -> tuple[np.ndarray, ...]:
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


def _predict_rows(fwd: Callable, params: dict, rows: Batch) -> tuple[np.ndarray, ...]:
    """(y, mu, sigma) of resident rows: fixed-size slices dispatched back to back, at most
    PREDICT_IN_FLIGHT at a time, one transfer to the host at the end."""
    n = len(rows["y"])
    if n == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    bs = min(PREDICT_BATCH, n)
    outs = []
    for i in range(0, n, bs):
        part = {k: rows[k][i : i + bs] for k in MODEL_INPUTS}
        pad = bs - len(part["tags"])
        if pad:  # the last slice, padded to the compiled size (not a copy of all the rows)
            part = {k: np.concatenate([v, rows[k][:pad]]) for k, v in part.items()}
        outs.append(fwd(params, part))
        if len(outs) > PREDICT_IN_FLIGHT:
            outs[-PREDICT_IN_FLIGHT - 1][0].block_until_ready()
    mu = np.asarray(jnp.concatenate([o[0] for o in outs]))[:n]
    sigma = np.asarray(jnp.concatenate([o[1] for o in outs]))[:n]
    return rows["y"], mu, sigma


def _nll(y: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    return float(np.asarray(gaussian_nll(mu, sigma, y), np.float64).mean())


def _calibrated_nll(y: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """The NLL after `calibrate_scale`'s factor: how early stopping judges a checkpoint, since
    every fit is published calibrated (training on its own residuals makes the deep stage's
    raw sigma overconfident, which would stop it before its mean has improved)."""
    factor = float(np.sqrt(np.mean(np.square((y - mu) / sigma)))) if y.size else 1.0
    return _nll(y, mu, sigma * factor)


def calibrate_scale(params: dict, y: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """Set the sigma factor that minimises the Gaussian NLL on (y, mu, sigma): the root mean
    squared z-score. Returns the factor; `params` must not be calibrated yet."""
    factor = float(np.sqrt(np.mean(np.square((y - mu) / sigma)))) if y.size else 1.0
    params["sigma_calibration"] = np.asarray(math.log(factor), np.float32)
    return factor


def predict_rows(
    config: ModelConfig, layout: FeatureLayout, params: dict, rows: Batch
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, mu, sigma) of loaded rows, through the model's one compiled forward pass."""
    return _predict_rows(forward_for(config, layout), params, rows)


def calibrate_on_rows(
    config: ModelConfig, layout: FeatureLayout, params: dict, rows: Batch
) -> float:
    """`calibrate_scale` on loaded rows, scored through the model's jitted forward."""
    return calibrate_scale(params, *predict_rows(config, layout, params, rows))


def _resident_chunks(
    n: int, batch_size: int, seed: int, epoch: int, chunk: int
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """One epoch over `n` resident rows: (idx [chunk, B], weight [chunk, B], real steps) per
    chunk, from a fresh permutation; the last batch is padded with weight-0 rows."""
    perm = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    idx = np.concatenate([perm, np.zeros(pad, np.int32)]).reshape(steps, batch_size)
    weight = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    weight = weight.reshape(steps, batch_size)
    for s0 in range(0, steps, chunk):
        real = min(chunk, steps - s0)
        i, w = idx[s0 : s0 + real], weight[s0 : s0 + real]
        if real < chunk:
            i = np.concatenate([i, np.zeros((chunk - real, batch_size), np.int32)])
            w = np.concatenate([w, np.zeros((chunk - real, batch_size), np.float32)])
        yield i, w, real


def _streamed_chunks(
    data: ParquetBatches, epoch: int, chunk: int
) -> Iterator[tuple[Batch, np.ndarray, np.ndarray, int]]:
    """One epoch streamed from the file: `chunk` batches stacked into rows, with the index
    and weight matrices that walk them in order."""
    bs = data.batch_size
    idx = np.arange(chunk * bs, dtype=np.int32).reshape(chunk, bs)
    batches: list[Batch] = []

    def emit() -> tuple[Batch, np.ndarray, np.ndarray, int]:
        real = len(batches)
        full = batches + [batches[-1]] * (chunk - real)
        rows = {k: np.concatenate([b[k] for b in full]) for k in (*MODEL_INPUTS, "y")}
        weight = np.stack([b["weight"] for b in full])
        return rows, idx, weight, real

    for batch in data.epoch(epoch):
        batches.append(batch)
        if len(batches) == chunk:
            yield emit()
            batches = []
    if batches:
        yield emit()


def _resident(data: ParquetBatches) -> bool:
    """Whether `data`'s rows are kept resident while training (else they stream)."""
    limit = RESIDENT_MAX_BYTES if on_accelerator() else CPU_RESIDENT_MAX_BYTES
    return data.num_rows() * data.row_bytes() <= limit


def train(
    config: ModelConfig,
    layout: FeatureLayout,
    data: ParquetBatches,
    log: Log = print,
    log_every_s: float = 10.0,
    validation: ParquetBatches | None = None,
    init: dict | None = None,
    frozen: tuple[tuple[str, ...], ...] = (),
) -> TrainResult:
    """Fit on `data`, starting from `init` if given and never updating params under `frozen`
    paths. With `validation` rows: keep the params that score best on them (the starting
    point included), stop early when they stop improving, and calibrate sigma on them.

    The loop keeps the device busy: the training rows stay resident on it when they fit
    (RESIDENT_MAX_BYTES; else they stream in chunks), CHUNK_STEPS steps run per dispatch, and
    the host reads the loss once per chunk; validation rows are resident and scored through
    one jitted forward."""
    model = make_model(config, layout)
    fwd = forward_for(config, layout)
    steps_per_epoch = data.steps()
    if steps_per_epoch == 0:
        raise ValueError("no training rows in the feature matrix")
    # Small data needs more passes to converge: at least `min_steps` steps, in whole epochs.
    epochs = max(config.epochs, -(-scaled_min_steps(config) // steps_per_epoch))
    total = epochs * steps_per_epoch
    tx = _optimizer(config, total, frozen)
    params = init_params(config, layout) if init is None else init
    opt_state = jax.jit(tx.init)(params)  # one program, not one compile per state leaf
    run = _chunk_runner(model, tx, jax.random.PRNGKey(config.seed + 1))
    # Scored a few times per epoch, but not so often that a tiny slice's noise stops the run;
    # chunks end on scoring steps.
    eval_every = max(MIN_EVAL_STEPS, steps_per_epoch // max(1, config.evals_per_epoch))
    chunk = min(CHUNK_STEPS, eval_every, steps_per_epoch)
    eval_every = -(-eval_every // chunk) * chunk

    t_load = time.perf_counter()
    wait_start = data.wait_seconds  # the loader may be shared by several fits
    resident = _resident(data)
    rows = None
    if resident:
        # Read, not loaded: the device's copy is the one kept.
        rows = jax.device_put({k: v for k, v in data.read().items() if k in (*MODEL_INPUTS, "y")})
    val_rows = validation.load() if validation is not None else None
    has_val = val_rows is not None and len(val_rows["y"]) > 0
    load_seconds = time.perf_counter() - t_load
    log(
        f"training: {data.num_rows():,} posts ({'resident' if resident else 'streamed'}), "
        f"up to {epochs} epochs x {steps_per_epoch} steps of {config.batch_size}, "
        f"{chunk} steps per dispatch"
    )
    history: list[dict] = []
    val_curve: list[dict] = []
    # (nll, step, params, the validation slice's (y, mu, sigma) under those params)
    best = (math.inf, 0, None, None)
    stale = 0
    if has_val and init is not None:
        scored = _predict_rows(fwd, params, val_rows)
        nll = _calibrated_nll(*scored)
        val_curve.append({"step": 0, "nll": nll})
        best = (nll, 0, jax.device_get(params), scored)
    t_start = time.perf_counter()
    t_log = t_start
    eval_seconds = 0.0
    steady: tuple[float, float, int] | None = None  # (time, eval seconds, step) after compiling
    running, n_running, global_step = 0.0, 0, 0
    record_every = max(1, total // 200)
    valid_mask = np.arange(chunk)
    stop = False
    for epoch in range(epochs):
        if stop:
            break
        if resident:
            chunks = (
                (rows, i, w, real)
                for i, w, real in _resident_chunks(
                    data.num_rows(), config.batch_size, config.seed, epoch, chunk
                )
            )
        else:
            chunks = _streamed_chunks(data, epoch, chunk)
        for chunk_rows, idx, weight, real in chunks:
            params, opt_state, losses = run(
                params, opt_state, chunk_rows, idx, weight, valid_mask < real, global_step
            )
            losses = np.asarray(losses)[:real]
            if not resident:
                # Each dispatch on streamed rows allocates buffers of a few MB on several
                # threads (the chunk, XLA's outputs and temporaries), which glibc's arenas keep
                # once freed: 0.5 GB at 6M posts. Handed back once per chunk of steps.
                release_memory(collect=False)
            if steady is None:  # the first dispatch compiled the step: throughput from here
                steady = (time.perf_counter(), eval_seconds, global_step + real)
            bad = np.flatnonzero(~np.isfinite(losses))
            if bad.size:
                raise NonFiniteLossError(
                    f"training loss became {losses[bad[0]]} at step {global_step + bad[0] + 1} "
                    f"(epoch {epoch + 1}); params were not saved"
                )
            for loss_v in losses.tolist():
                global_step += 1
                running += loss_v
                n_running += 1
                if global_step % record_every == 0 or global_step == total:
                    history.append(
                        {"step": global_step, "epoch": epoch, "loss": running / n_running}
                    )
                    running, n_running = 0.0, 0
            now = time.perf_counter()
            if now - t_log >= log_every_s or global_step == total:
                elapsed = now - t_start - eval_seconds
                rate = global_step * config.batch_size / elapsed
                eta = (total - global_step) * elapsed / global_step
                log(
                    f"step {global_step}/{total} epoch {epoch + 1} loss {losses.mean():.4f} "
                    f"{rate:,.0f} posts/s, ETA {eta:.0f}s"
                )
                t_log = now
            if has_val and (global_step % eval_every == 0 or global_step == total):
                t_eval = time.perf_counter()
                scored = _predict_rows(fwd, params, val_rows)
                nll = _calibrated_nll(*scored)
                eval_seconds += time.perf_counter() - t_eval
                val_curve.append({"step": global_step, "nll": nll})
                if nll < best[0]:
                    best, stale = (nll, global_step, jax.device_get(params), scored), 0
                else:
                    stale += 1
                if stale >= config.patience:
                    log(
                        f"early stop at step {global_step}: validation NLL {nll:.4f}, best "
                        f"{best[0]:.4f} at step {best[1]}"
                    )
                    stop = True
                    break
    seconds = time.perf_counter() - t_start - eval_seconds
    rate = global_step * config.batch_size / seconds
    if steady is not None and global_step > steady[2]:
        steady_seconds = time.perf_counter() - steady[0] - (eval_seconds - steady[1])
        rate = (global_step - steady[2]) * config.batch_size / steady_seconds
    final = jax.device_get(params) if best[2] is None else best[2]
    factor = 1.0
    if has_val:
        final = jax.tree_util.tree_map(np.array, final)  # a writable copy
        scored = best[3] if best[2] is not None else _predict_rows(fwd, final, val_rows)
        factor = calibrate_scale(final, *scored)  # scored when it was the best
        log(f"best validation NLL {best[0]:.4f} at step {best[1]}; sigma x {factor:.3f}")
    return TrainResult(
        params=final,
        steps=global_step,
        seconds=seconds,
        data_wait_seconds=load_seconds + data.wait_seconds - wait_start,
        posts_per_second=rate,  # compilation excluded
        history=history,
        validation=val_curve,
        best_step=best[1] if best[2] is not None else global_step,
        sigma_calibration=factor,
        eval_seconds=eval_seconds,
        device=device_name(),
    )


def baseline_config(config: ModelConfig, architecture: str = "linear") -> ModelConfig:
    return dataclasses.replace(
        config,
        architecture=architecture,
        epochs=config.baseline_epochs,
        min_steps=config.baseline_min_steps,
    )


@dataclass
class Fits:
    model: TrainResult
    linear: TrainResult  # the baseline
    additive: TrainResult | None = None  # the model's first stage, when fitted in stages


def fit_with_baseline(
    config: ModelConfig,
    layout: FeatureLayout,
    data: ParquetBatches,
    validation: ParquetBatches | None = None,
    log: Log = print,
) -> Fits:
    """The model and the linear baseline, fitted on the same rows. With `config.warm_start`
    the model is fitted in two stages: an additive stage (the baseline's terms plus
    per-category shrinkage of the tag effects), then the deep part on top of it, the additive
    terms frozen."""
    log("fitting the linear baseline")
    linear = train(baseline_config(config), layout, data, log, validation=validation)
    if config.architecture == "linear":
        return Fits(linear, linear)
    if not config.warm_start:
        log("fitting the model from scratch")
        return Fits(train(config, layout, data, log, validation=validation), linear)
    log("fitting the additive stage: tag effects shrunk by category and rarity")
    additive = train(baseline_config(config, "additive"), layout, data, log, validation=validation)
    log("fitting the deep part on top of the additive stage")
    init = warm_start(init_params(config, layout), additive.params)
    model = train(config, layout, data, log, validation=validation, init=init, frozen=WARM_FROZEN)
    return Fits(model, linear, additive)


def predict(
    config: ModelConfig, layout: FeatureLayout, params: dict, data: ParquetBatches
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, mu, sigma) for every real row of `data`: from its rows loaded once (and kept with
    `data` for the next model scored on them) where they take at most RESIDENT_PREDICT_BYTES,
    else streamed in batches."""
    fwd = forward_for(config, layout)
    if data.num_rows() * data.row_bytes() <= RESIDENT_PREDICT_BYTES:
        return _predict_rows(fwd, params, data.load())
    return _predict(fwd, params, data)


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
