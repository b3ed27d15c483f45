"""Pure tensor functions (torch only): masked reductions, log-probs, losses."""
