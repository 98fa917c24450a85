"""The model wing: what a backbone is, what makes a vector, and how the model is built.

Floors, each importing only from the ones below it (``tests/test_architecture.py`` checks it):

- ``specs``: the shapes of registry entries (:class:`~transforms.models.specs.BackboneSpec` for the
  ``keras.applications`` CNNs, :class:`~transforms.models.specs.HubSpec` for KerasHub presets), the
  KerasHub family table, and the words every floor shares (poolings, precisions, weight keywords);
- ``registry``: every backbone, as data (no Keras import);
- ``weights``: resolving ``--weights`` (keywords, files, folders, handles), fingerprints, the one
  cache folder; ``weights.checkpoints`` reads a checkpoint's architecture and preprocessing,
  ``weights.sample`` prepares the offline real backbone;
- ``recipe``: :class:`~transforms.models.recipe.FeatureRecipe`, everything that decides a vector;
- the builders: ``preprocessing`` (the saveable preprocessing layer), ``readout`` (pooling, named
  layer and L2 normalisation, one step for every family), ``applications`` and ``hub`` (one
  builder per family kind), ``zero_shot`` (text prompts), and ``build`` (the entry points);
- ``weights.stage``: staging a backbone's weights for a cluster (it builds models).

Keras, TensorFlow and KerasHub are imported only inside functions that build or read models.
"""
