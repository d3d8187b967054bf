"""Trainer callbacks: :mod:`gradstats.integrations.lightning` (Lightning) and
:mod:`gradstats.integrations.huggingface` (Hugging Face ``Trainer``). Each is imported on its own,
so neither trainer is needed by the other or by the library."""
