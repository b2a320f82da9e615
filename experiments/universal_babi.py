"""The Universal Transformer's bAbI table (Dehghani et al., ICLR 2019, Table 1) at CPU scale:
a vanilla Transformer, the Universal Transformer (one layer applied at every step, with the
per-step position and timestep signal) and UT + adaptive computation time, at the same
width and maximum depth, equal steps, 3 seeds.

  python -m crosslayer.sweep experiments/universal_babi.py --root=experiments/results/universal_babi --workers=2
  python -m crosslayer.report experiments/results/universal_babi

scale="cpu": bAbI 1k, the 20 tasks trained jointly (configs/qa.py:babi), the facts encoding
(one encoder position per sentence, as UT and MemN2N), K = 20 story sentences, d = 128,
encoder 6 steps (the most ACT may take), decoder 2 layers (answers are 1-3 pieces).
The UT variants share one set over every step of both stacks (`all`) and inject positions
and timesteps at every step; the vanilla Transformer has its own set per layer and
positions at the input. ACT runs in the encoder (where bAbI's reasoning happens).
scale="paper": the same with the 10k set (configs/qa.py:babi_10k; here its qa3 training
file is missing) and more steps; not run here.

Size: the UT + ACT variant trains at 0.56 s a step on one core of the 2-core machine
(a 40-step timing run with these overrides, steps 10-40, CROSSLAYER_CPUS=0). In the sweep
(`--workers=2`, two runs side by side) the transformer runs took 3193 and 3219 s each,
evaluation included (about 0.64 s a step): about 8 core-hours for the 9 runs.

The report's columns add the test split's mean ponder steps (ACT) per seed; per-task errors
are in each run's results.json (eval.test.per_task_error).
"""

# The paper's numbers (Dehghani et al. 2019, Table 1): mean error (%) and failed tasks
# (error > 5%) of 20, trained jointly on all tasks.
PAPER_TABLE = (
    # (model, 1k mean error, 1k failed, 10k mean error, 10k failed)
    ("Transformer", 26.8, 14, 22.1, 12),
    ("Universal Transformer", 8.50, 8, 0.47, 0),
    ("UT + ACT", 7.78, 5, 0.29, 0),
)

_UT = {"model.sharing.strategy": "all", "model.sharing.num_sets": 1,
       "model.position.inject": "every_layer"}


def get_experiment(scale: str = "cpu") -> dict:
  variants = [
      ("transformer", {"model.sharing.strategy": "none", "model.sharing.num_sets": 0}),
      ("universal", dict(_UT)),
      ("universal_act", {**_UT, "model.act.encoder": True}),
  ]
  overrides = {
      "data.encoding": "facts",
      "data.max_story_sentences": 20,
      "model.emb_dim": 128, "model.num_heads": 4, "model.mlp_dim": 512,
      "model.num_encoder_layers": 6, "model.num_decoder_layers": 2,
      "train.max_train_seconds": 0.0,          # a sweep compares at equal steps
      "train.eval_every": 1000,
      "train.checkpoint_every": 250,
      "train.checkpoint_every_seconds": 300.0,
  }
  if scale == "cpu":
    return {"config": "configs/qa.py:babi",
            "overrides": {**overrides, "train.num_steps": 5000},
            "variants": variants, "seeds": (0, 1, 2),
            "columns": ("eval.test.ponder.encoder.mean",)}
  if scale == "paper":
    return {"config": "configs/qa.py:babi_10k",
            "overrides": {**overrides, "train.num_steps": 40_000},
            "variants": variants, "seeds": (0, 1, 2),
            "columns": ("eval.test.ponder.encoder.mean",)}
  raise ValueError(f"scale: {scale!r} is not one of 'cpu', 'paper'")
