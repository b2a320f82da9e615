"""Cross-layer parameter sharing as a layer -> parameter-set schedule.

This is the only module that knows strategy names. A schedule is a tuple with one
entry per layer (0-based) giving the index of the parameter set that layer uses.
The model (`crosslayer/model/stack.py`) applies any schedule with one `nn.scan`,
so nothing downstream branches on a strategy.

Strategies (N layers, M sets):

  none       every layer its own set (M == N).                   Vaswani et al. 2017
  all        one set for every layer (M == 1).                    Dehghani et al. 2019 (Universal
                                                                  Transformer); Lan et al. 2020
                                                                  (ALBERT); Dabre & Fujita 2019
  sequence   runs of consecutive layers share a set:              Takase & Kiyono 2021
             layer i -> floor(i * M / N). N=6, M=3 -> 0,0,1,1,2,2.
             When M does not divide N the runs differ in length by at most one
             (the longer runs come last), which is the paper's rule extended
             to any N >= M.
  cycle      layer i -> i mod M. N=6, M=3 -> 0,1,2,0,1,2.         Takase & Kiyono 2021
  cycle_rev  the first N-M layers follow `cycle`, the last M      Takase & Kiyono 2021
             layers use the sets in reverse order.
             N=6, M=3 -> 0,1,2,2,1,0.
  sandwich   first and last layer have their own sets (0 and     Reid et al. 2021 (Subformer)
             M-1); the middle N-2 layers share sets 1..M-2 in
             `sequence` order. N=6, M=3 -> 0,1,1,1,1,2. Needs M >= 3 (or M == N).
  custom     an explicit tuple (config field `custom`), one entry per layer; every
             set in 0..M-1 must be used.

Every strategy needs 1 <= M <= N. `num_sets == 0` means "the strategy's default"
(N for `none`, 1 for `all`; the others have no default).

Adaptive computation time (`config.model.act`, `crosslayer/model/act.py`) adds one more
component to a stack, `halting` (the halting unit), which always follows the stack's
schedule: one unit shared by every step with `all` (the Universal Transformer), one per
set of the cycle with `cycle`, and so on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

STRATEGIES = ("none", "all", "sequence", "cycle", "cycle_rev", "sandwich", "custom")

# Components whose parameters can follow a stack's schedule (config.model.sharing.components).
COMPONENTS = (
    "encoder_self_attention",
    "decoder_self_attention",
    "decoder_cross_attention",
    "feed_forward",
    "layer_norm",
)

# Per stack: layer component name -> config component name.
STACK_COMPONENTS = {
    "encoder": {
        "self_attention": "encoder_self_attention",
        "feed_forward": "feed_forward",
        "layer_norm": "layer_norm",
    },
    "decoder": {
        "self_attention": "decoder_self_attention",
        "cross_attention": "decoder_cross_attention",
        "feed_forward": "feed_forward",
        "layer_norm": "layer_norm",
    },
}


def _fail(field: str, msg: str) -> None:
  raise ValueError(f"{field}: {msg}")


def schedule(strategy: str, num_layers: int, num_sets: int, custom: Sequence[int] = (),
             *, field: str = "config.model.sharing") -> tuple[int, ...]:
  """Returns the parameter-set index of every layer (0-based).

  Args:
    strategy: one of STRATEGIES.
    num_layers: N, the number of layers of the stack.
    num_sets: M, the number of parameter sets; 0 means the strategy's default.
    custom: the explicit schedule for strategy "custom".
    field: the config path named in error messages.
  Raises:
    ValueError naming the field and the allowed values on any impossible combination.
  """
  n = num_layers
  if strategy not in STRATEGIES:
    _fail(f"{field}.strategy", f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
  if not isinstance(n, int) or n < 1:
    _fail("config.model.num_*_layers", f"the number of layers must be an int >= 1, got {n!r}")
  m = num_sets
  if m == 0:
    if strategy == "none":
      m = n
    elif strategy == "all":
      m = 1
    elif strategy == "custom" and custom:
      m = max(custom) + 1
    else:
      _fail(f"{field}.num_sets", f"strategy {strategy!r} needs num_sets in 1..{n} (got 0)")
  if not isinstance(m, int) or not 1 <= m <= n:
    _fail(f"{field}.num_sets", f"must be in 1..{n} (the number of layers) for strategy "
          f"{strategy!r}, got {m!r}")
  if strategy != "custom" and custom:
    _fail(f"{field}.custom", f"is only used with strategy 'custom'; got {tuple(custom)!r} with "
          f"strategy {strategy!r}")

  if strategy == "none":
    if m != n:
      _fail(f"{field}.num_sets", f"strategy 'none' needs num_sets == num_layers ({n}) or 0, got {m}")
    return tuple(range(n))
  if strategy == "all":
    if m != 1:
      _fail(f"{field}.num_sets", f"strategy 'all' needs num_sets == 1 (or 0), got {m}")
    return (0,) * n
  if strategy == "sequence":
    return tuple(i * m // n for i in range(n))
  if strategy == "cycle":
    return tuple(i % m for i in range(n))
  if strategy == "cycle_rev":
    return tuple(i % m for i in range(n - m)) + tuple(range(m - 1, -1, -1))
  if strategy == "sandwich":
    if m == n:
      return tuple(range(n))
    if m < 3:
      _fail(f"{field}.num_sets", f"strategy 'sandwich' needs num_sets >= 3 (first, middle, last) "
            f"or num_sets == num_layers, got {m}")
    mid = n - 2
    return (0,) + tuple(1 + j * (m - 2) // mid for j in range(mid)) + (m - 1,)
  # custom
  custom = tuple(custom)
  if len(custom) != n:
    _fail(f"{field}.custom", f"needs one set index per layer ({n} entries), got {len(custom)}: "
          f"{custom!r}")
  if not all(isinstance(s, int) and 0 <= s < m for s in custom):
    _fail(f"{field}.custom", f"entries must be ints in 0..{m - 1} (num_sets={m}), got {custom!r}")
  unused = sorted(set(range(m)) - set(custom))
  if unused:
    _fail(f"{field}.custom", f"sets {unused} are never used (num_sets={m}); every set must be "
          f"used by at least one layer")
  return custom


@dataclasses.dataclass(frozen=True)
class StackSchedules:
  """Resolved schedules of one stack: layer component name -> schedule."""
  num_layers: int
  components: Mapping[str, tuple[int, ...]]

  def num_sets(self, component: str) -> int:
    return max(self.components[component]) + 1


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


def resolve_schedules(model_cfg: Any) -> dict[str, StackSchedules]:
  """Schedules of every stack and component from `config.model`.

  Components named in `config.model.sharing.components` follow their stack's
  schedule; the others keep one set per layer. The decoder follows
  `config.model.decoder_sharing` unless its strategy is "" (same as the encoder).
  """
  sharing = _get(model_cfg, "sharing")
  comps = tuple(_get(sharing, "components", COMPONENTS))
  bad = [c for c in comps if c not in COMPONENTS]
  if bad:
    _fail("config.model.sharing.components", f"unknown components {bad}; allowed: "
          f"{', '.join(COMPONENTS)}")
  dec = _get(model_cfg, "decoder_sharing", None)
  own_decoder = dec is not None and bool(_get(dec, "strategy", ""))
  stacks = {
      "encoder": (int(_get(model_cfg, "num_encoder_layers")), sharing, "config.model.sharing",
                  False),
      "decoder": (int(_get(model_cfg, "num_decoder_layers")), dec if own_decoder else sharing,
                  "config.model.decoder_sharing" if own_decoder else "config.model.sharing",
                  not own_decoder),
  }
  out = {}
  for stack, (n, shr, field, inherited) in stacks.items():
    strategy = _get(shr, "strategy")
    num_sets = int(_get(shr, "num_sets", 0))
    if inherited and strategy == "none":
      num_sets = 0  # `none` means one set per layer, whatever the decoder's depth
    sched = schedule(strategy, n, num_sets, tuple(_get(shr, "custom", ())), field=field)
    comp_scheds = {layer_comp: (sched if cfg_comp in comps else tuple(range(n)))
                   for layer_comp, cfg_comp in STACK_COMPONENTS[stack].items()}
    position = _get(model_cfg, "position", None)
    if (position is not None and _get(position, "inject") == "every_layer"
        and _get(position, "kind") == "learned"):
      # Universal-Transformer-style position tables added at every layer:
      # one table for all layers ("shared") or one per layer ("per_layer").
      per_layer = _get(position, "layer_tables") == "per_layer"
      comp_scheds["position"] = tuple(range(n)) if per_layer else (0,) * n
    act = _get(model_cfg, "act", None)
    if act is not None and _get(act, stack, False):
      comp_scheds["halting"] = sched  # ACT's halting unit follows the stack's schedule
    out[stack] = StackSchedules(n, comp_scheds)
  return out


def describe(schedules: Mapping[str, StackSchedules]) -> dict[str, dict[str, list[int]]]:
  """JSON-friendly form of resolved schedules (results.json["schedules"])."""
  return {stack: {c: list(s) for c, s in st.components.items()} for stack, st in schedules.items()}
