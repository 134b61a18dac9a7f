"""Serving: the BentoML service and what it holds (no torch anywhere below this package).

* :mod:`~stepwise.serve.service`: the HTTP surface (``bentoml serve stepwise.serve.service:Translator``):
  request and response schemas, errors as status codes, the endpoints;
* :mod:`~stepwise.serve.options`: the request options (one typed object from the schema to the search),
  every request limit, and the check of a request against its model;
* :mod:`~stepwise.serve.store`: loaded exports, registry versions, the default model and a cache of others;
* :mod:`~stepwise.serve.batching`: adaptive batching of concurrent requests;
* :mod:`~stepwise.serve.translation`: a batch of requests translated (what the decoding thread runs);
* :mod:`~stepwise.serve.streams`: streamed requests' events, and server-sent events;
* :mod:`~stepwise.serve.responses`, :mod:`~stepwise.serve.attention_codec`, :mod:`~stepwise.serve.alignment`,
  :mod:`~stepwise.serve.sentences`: response shaping (answers, compact attention, word alignments,
  sentence splitting);
* :mod:`~stepwise.serve.client`: a small Python client of the service.
"""
