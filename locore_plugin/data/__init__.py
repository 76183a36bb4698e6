"""Data that is built, not read: the synthetic worlds of the demo and tests, and the training lists
(query, global shortlist, labels) every method trains on."""
