"""Integrations with the libraries where models and training loops already live.

Each submodule imports its library (an optional extra: ``neuralign[hf]``,
``neuralign[timm]``, ``neuralign[lightning]``); ``import neuralign`` imports none of them.
``neuralign.convert`` imports the hf and timm ones by itself when their library is already
imported (``neuralign.convert.INTEGRATIONS``), so their layer families are converted with
no step of the user's.

* :mod:`neuralign.integrations.hf`: Hugging Face transformers (GPT-2's ``Conv1D`` as a layer
  family, saving and loading converted models).
* :mod:`neuralign.integrations.timm`: timm's own ``Linear`` as a layer family.
* :mod:`neuralign.integrations.lightning`: a Lightning callback that steps the feedback recipe.
"""
