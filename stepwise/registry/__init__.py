"""The model registry: ClearML as stepwise uses it.

* :mod:`~stepwise.registry.tracking`: connecting the ``clearml`` SDK (configuration, reachability);
* :mod:`~stepwise.registry.client`: the one registry client (register, list, tag, download versions);
* :mod:`~stepwise.registry.promotion`: the BLEU gate that moves the ``production`` tag.
"""
