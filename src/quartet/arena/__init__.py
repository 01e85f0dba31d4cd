"""`quartet arena`: every algorithm on one task and one budget of generated model tokens, judged by ground truth.

`runner` trains and judges, `worlds` holds the tasks (the restaurant town of `quartet demo`, arithmetic, the
calculator and guess agents' worlds, reasoning-gym), `report` writes the arena's report.html. The worlds'
generators and verifiers live beside them: `arith`, `calculator`, `guess`.
"""
