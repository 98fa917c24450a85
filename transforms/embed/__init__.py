"""Embedding images in a worker: the model handler, the embedder, the per-process model cache.

- ``handler``: :class:`~transforms.embed.handler.BackboneModelHandler`, a Beam ``ModelHandler`` for
  a ``FeatureRecipe`` (usable with Beam's own ``RunInference`` in pipelines that compose their own
  graph), and the :class:`~transforms.embed.handler.FeatureModelHandler` interface the extraction
  needs (a fake one embeds in fast tests);
- ``embedder``: :class:`~transforms.embed.embedder.Embedder`, the backbone (optionally followed by
  a head) behind one compiled function, uint8 pixels in, with the frozen graph and its cache;
- ``model_cache``: one model per worker process, loaded in the background;
- ``decode``: reading and decoding one image for every backbone of a run;
- ``progress``: the progress bar or progress lines.

``transforms.extract`` drives them chunk by chunk.
"""
