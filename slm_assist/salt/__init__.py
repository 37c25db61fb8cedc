"""The SALT recipe (arXiv 2410.18779): pretraining on (1 - w_t)·CE + w_t·KD(SLM) over a selected subset.
Builds its objective and batch streams for the generic Trainer; never imported by another recipe."""
