"""The run folder, runs/<arch>/fold<k> (or runs/<arch>/full), in one package:

  files     every file a run folder holds, and the one way each is written and read (RunDir, checkpoints, RunMeta)
  prepare   a run folder before training: no accidental overwrite, a resume of the same experiment, free space
  find      run folders named on the command line (runs/<arch> or runs/<arch>/fold<k>) and ensemble members
"""
