"""`fastlm profile`: a phase breakdown of the training step (table, JSON, flow chart), a torch trace, and
re-runs under py-spy or Nsight Systems."""
