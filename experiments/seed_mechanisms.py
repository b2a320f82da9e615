"""Three sharing mechanisms besides whole layers, each against vanilla 3+3 on Multi30k: what
each saves in parameters against what it costs in BLEU.

  python -m crosslayer.sweep experiments/seed_mechanisms.py --root=experiments/results/seed_mechanisms --workers=2
  python -m crosslayer.report experiments/results/seed_mechanisms

1. Q/K/V projections shared within a layer: `separate` (vanilla) / `shared_kv` / `shared_qkv`,
   and one key/value head (`num_kv_heads=1`, multi-query).
2. Attention modules shared across layers: the attention components of all 3 layers of each
   stack use one set (`all`, components = the attentions), the feed-forwards stay per layer.
3. Positional encodings injected at every layer (Universal Transformer style) from a learned
   table shared across layers vs one table per layer, against sinusoidal at the input.
scale="cpu": the quick-start size, 800 steps, 3 seeds. scale="paper": WMT14 base; not run.
"""

ATTENTION = ("encoder_self_attention", "decoder_self_attention", "decoder_cross_attention")

VARIANTS = [
    ("vanilla", {}),
    ("shared_kv", {"model.qkv": "shared_kv"}),
    ("shared_qkv", {"model.qkv": "shared_qkv"}),
    ("one_kv_head", {"model.num_kv_heads": 1}),
    ("attention_shared_across_layers", {"model.sharing.strategy": "all",
                                        "model.sharing.components": ATTENTION}),
    ("positions_every_layer_shared", {"model.position.kind": "learned",
                                      "model.position.inject": "every_layer",
                                      "model.position.layer_tables": "shared"}),
    ("positions_every_layer_per_layer", {"model.position.kind": "learned",
                                         "model.position.inject": "every_layer",
                                         "model.position.layer_tables": "per_layer"}),
]


def get_experiment(scale: str = "cpu") -> dict:
  if scale == "cpu":
    return {
        "config": "configs/translation.py:multi30k_quick",
        "overrides": {
            "train.num_steps": 800,                # equal steps for every variant
            "train.max_train_seconds": 0.0,        # a sweep compares at equal steps
            "train.eval_every": 400,
            "train.checkpoint_every": 100,
            "train.checkpoint_every_seconds": 300.0,
        },
        "variants": VARIANTS,
        "seeds": (0, 1, 2),
    }
  if scale == "paper":
    return {"config": "configs/translation.py:wmt14",
            "overrides": {"train.max_train_seconds": 0.0, "train.num_steps": 100_000,
                          "model.num_encoder_layers": 6, "model.num_decoder_layers": 6},
            "variants": VARIANTS, "seeds": (0, 1, 2)}
  raise ValueError(f"scale: {scale!r} is not one of 'cpu', 'paper'")
