"""Serving: the BentoML service and what it holds (no torch anywhere below this package).

* :mod:`~stepwise.serve.service`: the HTTP surface (``bentoml serve stepwise.serve.service:Translator``);
* :mod:`~stepwise.serve.store`: loaded exports, registry versions, translation with them;
* :mod:`~stepwise.serve.batching`: adaptive batching of concurrent requests;
* :mod:`~stepwise.serve.attention_codec`, :mod:`~stepwise.serve.alignment`, :mod:`~stepwise.serve.sentences`:
  response shaping (compact attention, word alignments, sentence splitting);
* :mod:`~stepwise.serve.client`: a small Python client of the service.
"""
