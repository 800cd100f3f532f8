"""`fastlm report`: what a sweep or any set of run folders found, with the conditions of every number (tables,
plots, report.md and report.json), read from the runs' own files; it imports neither torch nor the trainer."""
