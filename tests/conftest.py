"""Shared test settings: offline, CPU, and a non-interactive plotting backend."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from a second thread, and on a busy 2-core machine two threads make step
# times swing ~10x; one thread keeps the tests (and the scripts they start) quick and steady.
os.environ.setdefault("OMP_NUM_THREADS", "1")
