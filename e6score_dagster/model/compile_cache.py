"""JAX's persistent compilation cache, so a fit compiles each program once per machine.

Every fit (each candidate, each cross-fitting fold, each daily run) builds fresh jitted
functions; the cache recognises the same program by its fingerprint and loads it instead of
compiling it again, which on a CPU costs seconds per fit. Bounded in size (least recently used
entries go first).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

MAX_CACHE_BYTES = 512 * 1024 * 1024


def use_compilation_cache(folder: Path) -> Path:
    """Cache compiled programs under `folder`, unless JAX_COMPILATION_CACHE_DIR already names a
    cache (then that one is kept). Returns the folder in use."""
    configured = os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    Path(folder).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Cache even quick compiles: a fit runs a dozen of them, each well under a second.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
    return Path(folder)
