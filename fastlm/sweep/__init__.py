"""`fastlm sweep` and `fastlm report`: a grid of ordinary training runs (LSTM against GRU, over layers, sizes,
bptt, ...), resumable, and the report that compares them with the conditions they were measured under."""
