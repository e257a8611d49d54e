"""The training side (never deployed): what `train_model.py`, `quantize_model.py`,
`python -m training.retrain` and `python -m training.default_stable` are made of.

- data.py, augment.py, epochs.py: the fixed split, the distortions, the epochs of a run
- architectures.py, fitting.py: the networks by recipe, fitting one (and distilling a student)
- quantize.py, browser_variant.py, install.py, card.py: int8 file, page copy, install, card
- evaluate.py, calibration.py: the evaluation sets, accuracy and expected calibration error
- release_gate.py, model_report.py, default_stable.py: a new version against stable, its
  report, and the stable version a fresh deployment starts with
- retrain.py, challenger.py, feedback_data.py, report.py: retraining on the users' feedback
"""
