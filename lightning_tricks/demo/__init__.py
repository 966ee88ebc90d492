"""The demo behind ``lightning-tricks demo``: data, model and the baseline-vs-recipe run."""
