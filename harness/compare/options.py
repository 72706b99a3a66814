"""Choices and defaults shared by ``weightgeom.harness.compare.analysis`` and its CLI (kept import-free so that
``harness --help`` does not load torch)."""

UNEMBED_CHOICES = ("after", "base")  # whose W_U spans the prediction subspace; the live metrics use AFTER's
C_A_MODELS = ("base", "after")  # which checkpoint runs over the text to measure C_a
DEFAULT_K = 8
DEFAULT_K_CURVE = (1, 2, 4, 8, 16, 32)
DEFAULT_N_TOKENS = 32768
DEFAULT_SEQ_LEN = 256
DEFAULT_BATCH_SIZE = 8
