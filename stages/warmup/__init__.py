"""Stage `warmup`: SFT warm-up of the tiny random-init teacher (64 frames) and the SFT student
baseline (1-group compressed memories). `stage.run` is the entry point; `data` builds the
curriculum's examples, `train` is the loop, `evaluate` scores per family with greedy decoding.
Measured recipe and learning curves: bench/warmup_experiment.py."""
