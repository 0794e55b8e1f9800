"""Combining fold runs into one prediction: read each run's predictions (`predictions`), combine them (`combine`:
averages, learned weights, thresholds; `neighbours`: k-NN correction; `prior`: label-shift correction), and score
out of fold or write a submission (`core`, with the challenge's `isbi` file)."""
