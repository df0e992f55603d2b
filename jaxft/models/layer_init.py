"""A stack of identical layers initialised by one compiled layer init, not one per layer.

``[make(rngs) for _ in range(n)]`` traced under ``jax.jit`` (the train state's sharded init) puts
n copies of the layer's initialisers into the program, each drawing from its own fold of the
seed: compile time grows with depth (the 1B LLaMA's init: 2.1 s at 2 layers, 9.5 s at 22 on a
2-core CPU; on an H200 it did not compile within 200 s).  `build_layers` builds layer 0 as
before, reads how many keys it drew, and draws layers 1..n-1 in one `jax.lax.scan` over the
layer index, each from the count it would have started at: every key is ``fold_in(stream key,
count)``, so the parameters are the ones the loop would have drawn (equal bit for bit under
``jax.jit``, tested), and the program holds one layer's init whatever the depth.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


class CountedKeys:
    """``nnx.Rngs(seed)``'s ``params()`` draws, key for key (``fold_in(stream key, n)`` for
    n = 0, 1, ...), with the counter a Python int instead of a traced array: tracing a model's
    initialisation (``jax.jit`` / ``jax.eval_shape`` of a train state) then costs no per-draw
    walk over the equations traced so far (see `registry._ShapeOnlyKeys`; 10 of the 14 s of tracing a
    32-layer LLaMA's init went there)."""

    def __init__(self, seed: int | jax.Array | None = None, *, key: jax.Array | None = None, count=0):
        if key is None:  # a seed array (an input of a jitted init) is what jax.random.key takes
            key = nnx.Rngs(seed if seed is None or isinstance(seed, int) else jax.random.key(seed)).params.key[...]
        self._key = key
        self.count = count  # the next draw's fold; a traced uint32 in a fork

    def params(self) -> jax.Array:
        key = jax.random.fold_in(self._key, self.count)
        self.count += 1
        return key

    __call__ = params

    @property
    def traced(self) -> bool:
        """Drawn inside a trace (``jax.jit`` / ``eval_shape``), where a layer scan saves compiling."""
        return isinstance(self._key, jax.core.Tracer)

    def fork_at(self, count) -> CountedKeys:
        """The same stream from draw ``count`` on (a traced count: `jaxft.models.layer_init`)."""
        return CountedKeys(key=self._key, count=count)


# Off: the plain loop (tests compare the two).
SCAN_INIT = True


def build_layers(n: int, make: Callable, rngs) -> nnx.List:
    """``nnx.List([make(rngs) for _ in range(n)])``: the same layers and parameters, and ``rngs``
    left where the loop would leave it.  With `CountedKeys` (the train state's init) inside a
    trace, layers 1..n-1 are drawn by one scan; any other ``rngs`` (``nnx.Rngs``, shape-only
    keys) takes the loop, as does an eager build (nothing to compile).  ``make`` must draw the
    same way for every layer (the layers of a stack do)."""
    if not SCAN_INIT or n <= 1 or not isinstance(rngs, CountedKeys) or not rngs.traced:
        return nnx.List([make(rngs) for _ in range(n)])  # eager: nothing to compile
    start = rngs.count
    first = make(rngs)
    step = rngs.count - start  # one layer's draws
    layer_def = []

    def one(_, i):
        layer_graphdef, state = nnx.split(make(rngs.fork_at(start + step * i)))
        layer_def.append(layer_graphdef)
        return None, state

    _, stacked = jax.lax.scan(one, None, jnp.arange(1, n, dtype=jnp.uint32))
    rngs.count = start + step * n
    # one `lax.split` per parameter: n - 1 slices cost ~0.2 ms each to trace (jnp's `a[i]` ~0.3)
    pieces = jax.tree.map(lambda a: [jax.lax.squeeze(p, (0,)) for p in jax.lax.split(a, (1,) * (n - 1))], stacked)
    rest = [nnx.merge(layer_def[0], jax.tree.map(lambda p, i=i: p[i], pieces, is_leaf=lambda x: isinstance(x, list)))
            for i in range(n - 1)]
    return nnx.List([first] + rest)
