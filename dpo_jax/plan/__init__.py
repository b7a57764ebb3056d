"""`dpo-jax plan`: a run compiled ahead of time for a TPU topology's abstract devices on any host — per-program memory
against the chip's HBM, the compiler's time estimate, collectives — and `--fit`'s search for the fastest settings
that fit. Nothing runs, nothing is allocated, no weights or data are read."""
