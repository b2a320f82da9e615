"""Schedules of every strategy against hand-written tables, and every invalid combination."""

import pytest

from crosslayer import sharing
from crosslayer.model.config import default_model_config

TABLES = [
    ("none", 6, 6, (), (0, 1, 2, 3, 4, 5)),
    ("none", 3, 0, (), (0, 1, 2)),
    ("all", 6, 1, (), (0, 0, 0, 0, 0, 0)),
    ("all", 4, 0, (), (0, 0, 0, 0)),
    ("sequence", 6, 3, (), (0, 0, 1, 1, 2, 2)),
    ("sequence", 6, 2, (), (0, 0, 0, 1, 1, 1)),
    ("sequence", 7, 3, (), (0, 0, 0, 1, 1, 2, 2)),  # runs differ by at most one
    ("sequence", 6, 6, (), (0, 1, 2, 3, 4, 5)),
    ("cycle", 6, 3, (), (0, 1, 2, 0, 1, 2)),
    ("cycle", 5, 2, (), (0, 1, 0, 1, 0)),
    ("cycle_rev", 6, 3, (), (0, 1, 2, 2, 1, 0)),
    ("cycle_rev", 18, 6, (), (0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0)),
    ("cycle_rev", 7, 3, (), (0, 1, 2, 0, 2, 1, 0)),
    ("cycle_rev", 3, 3, (), (2, 1, 0)),
    ("sandwich", 6, 3, (), (0, 1, 1, 1, 1, 2)),
    ("sandwich", 6, 4, (), (0, 1, 1, 2, 2, 3)),
    ("sandwich", 8, 4, (), (0, 1, 1, 1, 2, 2, 2, 3)),
    ("sandwich", 2, 2, (), (0, 1)),
    ("custom", 4, 2, (0, 1, 1, 0), (0, 1, 1, 0)),
    ("custom", 4, 0, (0, 1, 1, 0), (0, 1, 1, 0)),
]


@pytest.mark.parametrize("strategy,n,m,custom,expected", TABLES)
def test_schedule_tables(strategy, n, m, custom, expected):
  assert sharing.schedule(strategy, n, m, custom) == expected


INVALID = [
    ("bogus", 6, 3, (), "strategy"),
    ("none", 6, 3, (), "num_sets"),
    ("all", 6, 2, (), "num_sets"),
    ("sequence", 6, 0, (), "num_sets"),
    ("sequence", 6, 7, (), "num_sets"),
    ("cycle", 4, -1, (), "num_sets"),
    ("cycle_rev", 3, 4, (), "num_sets"),
    ("sandwich", 6, 2, (), "num_sets"),
    ("custom", 4, 2, (0, 1, 1), "custom"),
    ("custom", 4, 2, (0, 1, 2, 0), "custom"),
    ("custom", 4, 3, (0, 1, 1, 0), "custom"),   # set 2 never used
    ("cycle", 4, 2, (0, 1, 0, 1), "custom"),    # custom given with another strategy
    ("cycle", 0, 1, (), "layers"),
]


@pytest.mark.parametrize("strategy,n,m,custom,field", INVALID)
def test_invalid_combinations_name_the_field(strategy, n, m, custom, field):
  with pytest.raises(ValueError, match=field) as e:
    sharing.schedule(strategy, n, m, custom)
  assert "config.model" in str(e.value)


def test_resolve_components_and_decoder_sharing():
  m = default_model_config()
  m.num_encoder_layers, m.num_decoder_layers = 6, 4
  m.sharing.strategy, m.sharing.num_sets = "cycle", 3
  m.sharing.components = ("feed_forward",)
  m.decoder_sharing.strategy, m.decoder_sharing.num_sets = "sequence", 2
  s = sharing.resolve_schedules(m)
  assert s["encoder"].components == {"self_attention": (0, 1, 2, 3, 4, 5),
                                     "feed_forward": (0, 1, 2, 0, 1, 2),
                                     "layer_norm": (0, 1, 2, 3, 4, 5)}
  assert s["decoder"].components["feed_forward"] == (0, 0, 1, 1)
  assert s["decoder"].components["cross_attention"] == (0, 1, 2, 3)
  # decoder_sharing.strategy = "" follows the encoder; `none` adapts to the decoder's depth
  m.decoder_sharing.strategy = ""
  m.sharing.strategy, m.sharing.num_sets = "none", 0
  s = sharing.resolve_schedules(m)
  assert s["decoder"].components["feed_forward"] == (0, 1, 2, 3)
  m.sharing.components = ("feed_forward", "bogus")
  with pytest.raises(ValueError, match="config.model.sharing.components"):
    sharing.resolve_schedules(m)
  m.sharing.components = sharing.COMPONENTS
  m.decoder_sharing.strategy, m.decoder_sharing.num_sets = "sandwich", 2
  with pytest.raises(ValueError, match="config.model.decoder_sharing.num_sets"):
    sharing.resolve_schedules(m)
