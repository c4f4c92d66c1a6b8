"""Shared code of the experiments: `data` (corpus, tokenizer, batches), `model` (GPT, bigram model),
`train` (the one training loop), `schedules`, `ladder` (the optimizer ladder), `stats`, `plots` and
`report` (arguments, output folder, results files). Import as ``from experiments._lib import train``."""
