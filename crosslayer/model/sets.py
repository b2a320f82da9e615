"""How a layer uses one of M stacked parameter sets of a component.

A shared component stores its M sets stacked on a leading `sets` axis (params
`[M, ...]`). At initialization `nn.vmap` creates the M sets (independent random
draws); afterwards `nn.map_variables` hands the module the set chosen by a
(traced) index. The scan over layers broadcasts the stacked params to every layer
(`variable_broadcast='params'`), so a set used by k layers is stored once and its
gradient is the sum of the k layers' gradients.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax


class SplitSets(tuple):
  """A component's M parameter sets as M separate arrays (a pytree leaf), picked by a
  Python int. Unrolled decoding splits the stacked sets once, before its loop
  (`split_sets`), so that no decoding step slices the layers' weights out of the stack."""


def split_sets(tree):
  """Every stacked leaf [M, ...] of `tree` as a SplitSets of its M sets."""
  return jax.tree.map(lambda x: SplitSets(x[i] for i in range(x.shape[0])), tree)


def _take(index):
  def take(tree):
    def one(x):
      if isinstance(x, SplitSets):
        return x[index]
      if isinstance(x, nn.meta.AxisMetadata):  # boxed (logically partitioned) params
        return x.replace_boxed(x.unbox()[index])
      return x[index]
    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return take


def component(parent: nn.Module, module_cls: type[nn.Module], name: str, index: Any,
              num_sets: int, **fields) -> Callable[..., Any]:
  """Returns a callable applying `module_cls(**fields)` with parameter set `index`.

  `index is None` builds a plain module with unstacked params (used by unrolled
  references and per-layer components in the unscanned form).
  """
  if index is None:
    return module_cls(name=name, parent=parent, **fields)
  if parent.is_initializing():
    stacked = nn.vmap(module_cls, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=None, out_axes=0,
                      axis_size=num_sets, metadata_params={nn.PARTITION_NAME: "sets"})(
                          name=name, parent=parent, **fields)
    return lambda *args: jax.tree.map(lambda y: y[index], stacked(*args))
  return nn.map_variables(module_cls, "params", trans_in_fn=_take(index), mutable=False)(
      name=name, parent=parent, **fields)
