"""`fastlm sweep`: a grid of ordinary training runs (LSTM against GRU, over layers, sizes, bptt, ...) in
processes of their own, resumable, ending with `fastlm report` (fastlm.report) on them."""
