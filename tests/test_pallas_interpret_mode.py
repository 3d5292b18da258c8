"""What the kernel tests rely on in Pallas interpret mode, checked so a jax upgrade cannot
silently turn the poison checks off."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _half_writer(x_ref, o_ref):
  @pl.when(pl.program_id(0) == 0)
  def _():
    o_ref[...] = x_ref[...]


def test_unwritten_output_stays_nan():
  """interpret=True starts outputs as NaN, so a kernel that skips a block leaves NaN there.

  (The TPU simulator, `pltpu.InterpretParams()`, is like a TPU: an unwritten output block gets
  whatever the reused VMEM buffer held, so the kernel tests poison-check with interpret=True.)
  """
  x = jnp.ones((16, 128), jnp.float32)
  out = pl.pallas_call(_half_writer, grid=(2,),
                       in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
                       out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)
  assert not jnp.isnan(out[:8]).any() and jnp.isnan(out[8:]).all()


def _pick_block(ids_ref, x_ref, o_ref):
  o_ref[...] = x_ref[...]


def test_scalar_prefetch_drives_index_map():
  """PrefetchScalarGridSpec runs on CPU: the prefetched ids choose the blocks read."""
  x = jnp.arange(8 * 4 * 128, dtype=jnp.float32).reshape(8 * 4, 128)
  ids = jnp.array([3, 0, 2], jnp.int32)
  out = pl.pallas_call(
      _pick_block,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(3,),
          in_specs=[pl.BlockSpec((8, 128), lambda i, ids: (ids[i], 0))],
          out_specs=pl.BlockSpec((8, 128), lambda i, ids: (i, 0))),
      out_shape=jax.ShapeDtypeStruct((24, 128), jnp.float32), interpret=True)(ids, x)
  want = np.concatenate([np.asarray(x)[8 * i:8 * (i + 1)] for i in (3, 0, 2)])
  np.testing.assert_array_equal(out, want)
