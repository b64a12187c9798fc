"""Recipes (the top layer): thin compositions of the Trainer, the attacks and the report.

run (``unlearn-fast run``: the main job), eval (``unlearn-fast eval``), teach (the default model taught
the corpus), methods (the one parser of method strings such as ``npo+sam+ilu``, shared with bench/),
presets (built-in training configs). Nothing below imports from here.
"""
