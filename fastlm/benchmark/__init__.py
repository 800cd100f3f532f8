"""`fastlm bench`: recurrent stacks and the training step, timed against baselines measured in the same run."""
