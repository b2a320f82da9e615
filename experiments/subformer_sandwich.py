"""Subformer's sandwich sharing (Reid et al. 2021) on summarization (AESLC): the first and
last layers own their parameters, the middle layers share one set.

  python -m crosslayer.sweep experiments/subformer_sandwich.py --root=experiments/results/subformer_sandwich --workers=2
  python -m crosslayer.report experiments/results/subformer_sandwich

At (about) equal unique parameters: vanilla 3+3 (`none`, 3 sets a stack), the sandwich over
6 layers with 3 sets (first / middle 4 / last), and `all` (1 set over 6 layers) with the
feed-forward widened to 2304 so that its one set holds about the 3 sets of the others (the
table gives the exact counts). scale="cpu": the aeslc_quick model (d=128) and data, 1,000
steps, 3 seeds. scale="paper": CNN/DailyMail at base size (configs/summarization.py:
cnn_dailymail, 6-layer vanilla against 12-layer sandwich / all); not run here.
"""


def get_experiment(scale: str = "cpu") -> dict:
  if scale == "cpu":
    return {
        "config": "configs/summarization.py:aeslc_quick",
        "overrides": {
            "train.num_steps": 1000,               # equal steps for every variant
            "train.max_train_seconds": 0.0,        # a sweep compares at equal steps
            "train.checkpoint_every": 250,
            "train.checkpoint_every_seconds": 300.0,
        },
        "variants": [
            ("none_3x3", {"model.num_encoder_layers": 3, "model.num_decoder_layers": 3}),
            ("sandwich_m3_6x6", {"model.num_encoder_layers": 6, "model.num_decoder_layers": 6,
                                 "model.sharing.strategy": "sandwich",
                                 "model.sharing.num_sets": 3}),
            ("all_m1_6x6_wide", {"model.num_encoder_layers": 6, "model.num_decoder_layers": 6,
                                 "model.sharing.strategy": "all", "model.mlp_dim": 2304}),
        ],
        "seeds": (0, 1, 2),
    }
  if scale == "paper":
    return {
        "config": "configs/summarization.py:cnn_dailymail",
        "overrides": {"train.max_train_seconds": 0.0, "train.num_steps": 100_000},
        "variants": [
            ("none_6x6", {}),
            ("sandwich_m6_12x12", {"model.num_encoder_layers": 12, "model.num_decoder_layers": 12,
                                   "model.sharing.strategy": "sandwich",
                                   "model.sharing.num_sets": 6}),
            ("all_m1_12x12_wide", {"model.num_encoder_layers": 12,
                                   "model.num_decoder_layers": 12,
                                   "model.sharing.strategy": "all", "model.mlp_dim": 14336}),
        ],
        "seeds": (0, 1, 2),
    }
  raise ValueError(f"scale: {scale!r} is not one of 'cpu', 'paper'")
