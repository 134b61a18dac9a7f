"""``bentoml serve`` from the repository root: the service lives in :mod:`stepwise.serve.service`."""

from stepwise.serve.service import Translator

__all__ = ["Translator"]
