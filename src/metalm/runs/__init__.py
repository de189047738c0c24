"""A run's life and what it leaves behind.

* `recipe`: `RunRecipe` (setup, train, evaluate, report, with their timings), `run`,
  `run_on_both_splits`;
* `trial`: one tuning trial (`meta_train`: meta-train and validate, no test);
* `protocols`: the test protocols (N-way K-shot episodes, full-way splits) and the
  baselines beside the learner;
* `accuracy`: accuracy with 95% intervals, per-episode scores and timings;
* `report`: `EvalReport` (JSON, Markdown, plots);
* `directory`: the run directory's files, finding its checkpoint;
* `existing`: what works on a finished run directory (resume, reload, re-evaluate,
  export).

Nothing is imported here: `from metalm.runs.recipe import run` (or `metalm.run`).
"""
