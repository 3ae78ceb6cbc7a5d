"""The inference runtime: ``sealtorch serve`` (Open Inference Protocol), ``sealtorch demo`` and
Gramine manifest templates.

- :mod:`.factory` checks a ``package.module:function`` factory against the policy's allow-list
  before anything is imported;
- :mod:`.model` builds the module through the factory and decrypts the sealed weights into it;
- :mod:`.loading` is the loading core of ``sealtorch serve`` and the KServe predictor;
- :mod:`.codec` reads and writes Open Inference Protocol tensors (JSON and binary data);
- :mod:`.batcher` runs dynamic batches on one inference thread with a fixed batch shape;
- :mod:`.app` is the Starlette app (KServe v2 REST, limits, rate limits, metrics);
- :mod:`.config` is the runtime's measured configuration (pinned key server key);
- :mod:`.gramine` writes Gramine manifest templates; :mod:`.demo` runs the whole flow locally.
"""
