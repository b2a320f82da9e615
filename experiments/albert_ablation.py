"""ALBERT's sharing ablation (Lan et al. 2020, Table 4) on translation: one layer's parameters
(strategy `all`, M=1 over N=6 layers) shared for none / the attention only / the
feed-forward only / every component.

  python -m crosslayer.sweep experiments/albert_ablation.py --root=experiments/results/albert_ablation --workers=2
  python -m crosslayer.report experiments/results/albert_ablation

ALBERT's finding (its Table 4, BERT-base size): sharing the attention costs little, sharing
the feed-forward costs most, sharing everything the most parameters saved. scale="cpu": Multi30k En->De at the
quick-start size, 800 steps, 3 seeds. scale="paper": WMT14 base size (6+6); not run here.
"""

ATTENTION = ("encoder_self_attention", "decoder_self_attention", "decoder_cross_attention")
EVERYTHING = ATTENTION + ("feed_forward", "layer_norm")


def _shared(components):
  return {"model.sharing.strategy": "all", "model.sharing.num_sets": 1,
          "model.sharing.components": tuple(components)}


def get_experiment(scale: str = "cpu") -> dict:
  variants = [
      ("not_shared", _shared(())),               # every layer its own parameters (vanilla 6+6)
      ("attention_shared", _shared(ATTENTION)),
      ("ffn_shared", _shared(("feed_forward",))),
      ("all_shared", _shared(EVERYTHING)),
  ]
  if scale == "cpu":
    return {
        "config": "configs/translation.py:multi30k_quick",
        "overrides": {
            "model.num_encoder_layers": 6, "model.num_decoder_layers": 6,
            "train.num_steps": 800,                # equal steps for every variant
            "train.max_train_seconds": 0.0,        # a sweep compares at equal steps
            "train.eval_every": 400,
            "train.checkpoint_every": 100,
            "train.checkpoint_every_seconds": 300.0,
        },
        "variants": variants,
        "seeds": (0, 1, 2),
    }
  if scale == "paper":
    return {"config": "configs/translation.py:wmt14",
            "overrides": {"train.max_train_seconds": 0.0, "train.num_steps": 100_000},
            "variants": variants, "seeds": (0, 1, 2)}
  raise ValueError(f"scale: {scale!r} is not one of 'cpu', 'paper'")
