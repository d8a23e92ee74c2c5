"""The model itself, read top to bottom like DeepSeek's own model file.

``configuration`` -> ``rope`` -> ``layers`` -> ``attention`` (MLA) -> ``cache`` (the latent cache) -> ``moe``
(router, experts, the dispatch seam) -> ``decoder`` -> ``mtp`` (the MTP block) -> ``losses`` (balance, MTP) ->
``model`` (forward + loss). It imports torch, transformers and the FP8 format and linear layer, nothing else of
this package: loading, MTP generation, parallelism, PEFT and the rest attach from outside (``modeling.py`` lists
them), and ``tests/unit/test_layout.py`` fails when an import here reaches a feature.
"""
