"""Experiments: fine-tuning and evaluating variants, and the reports that put them side by side.

* `compare` - fine-tune a source checkpoint into several variants with identical settings and evaluate each.
* `report` - the final evaluation of a recipe run: the adapted model beside the source model.
"""
