"""Hyperparameter sweeps: Ray Tune runs one training driver (TorchTrainer + DeepSpeed) per trial.

    refseg tune --config configs/debug.yaml --space tune/fusion_lr.yaml --num-samples 8 --output-dir runs/sweep
    refseg tune --resume runs/sweep          # finish an interrupted sweep; finished trials are not re-run

- :mod:`refseg.sweep.space` -- the search space YAML (dotted config keys -> distributions), trial
  configs, the resources one trial holds and how many fit at once (:func:`max_concurrent_trials`);
- :mod:`refseg.sweep.trial` -- one trial: a Tune function trainable (the "train driver" of Ray's
  Train+Tune user guide) running the same ``make_trainer`` / ``finish_training`` as ``refseg train`` into
  ``DIR/trials/<trial_id>/``, forwarding each validated epoch to Tune, where ASHA (``tune.scheduler``)
  picks weak trials on ``tune.metric`` and the trial ends its own Train run;
- :mod:`refseg.sweep.run` -- the Tuner: :func:`run_sweep`, :func:`resume_sweep`;
- :mod:`refseg.sweep.outputs` -- DIR's files: sweep.json (what --resume needs), trials.csv, best.yaml,
  summary.json, trials.png; Tune's experiment state goes to DIR/tune/.

Importing this package imports neither torch nor ray.
"""

from refseg.sweep.outputs import SweepState, collect_trials, write_sweep_outputs
from refseg.sweep.run import make_tuner, resume_sweep, run_sweep
from refseg.sweep.space import (
    TRIAL_CPUS,
    load_space,
    max_concurrent_trials,
    parse_space,
    per_trial_resources,
    read_space,
    trial_config,
    tune_domains,
)

__all__ = [
    "TRIAL_CPUS",
    "SweepState",
    "collect_trials",
    "load_space",
    "make_tuner",
    "max_concurrent_trials",
    "parse_space",
    "per_trial_resources",
    "read_space",
    "resume_sweep",
    "run_sweep",
    "trial_config",
    "tune_domains",
    "write_sweep_outputs",
]
