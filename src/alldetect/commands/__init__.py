"""Every `alldetect` command's code, one module each: read the arguments, call the library, print the outcome.

  data.py       index, split            train.py      train, cache          tune.py       tune
  predict.py    predict                 ensemble.py   ensemble              evaluate.py   evaluate
  report.py     report                  visualize.py  visualize             export.py     export
  bench.py      bench

`alldetect.cli` parses the command line and calls these; the library below them (data -> models -> engine ->
ensemble, report, tune, export, visualize) returns data and never imports a command.
"""
