"""fastmlm and Hugging Face transformers.

Two things live here:

- checkpoints (``fastmlm/hf/checkpoints.py``): BERT checkpoints in and out of fastmlm's own
  model, by key mapping: ``load_hf(path)``, ``save_hf(model, path)``, ``save_hf_tokenizer``; for
  fine-tuning (fastmlm.finetune), ``load_hf_encoder(path)`` and ``save_hf_classifier(model, path)``;
- the drop-in for transformers models, with no conversion:
  ``register()`` (``fastmlm/hf/attention.py``) adds ``attn_implementation="fastmlm"`` to
  transformers' attention and mask interfaces; ``patch(model)`` / ``unpatch(model)``
  (``fastmlm/hf/patch.py``) give a ``*ForMaskedLM`` fastmlm attention and a loss that
  projects only the masked rows, with the encoder on the real tokens only on the CPU
  (``fastmlm/hf/unpad.py``).

Importing this package does not import transformers.
"""
from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from .attention import FastMLMUnsupported, SlidingWindowMask, fastmlm_attention, fastmlm_mask, is_registered, register
from .checkpoints import (BIN_NAME, check_output_dir, classifier_config_to_hf, config_from_hf, config_to_hf, load_hf,
                          load_hf_encoder, read_hf_config, read_hf_weights, save_hf, save_hf_classifier,
                          save_hf_tokenizer, state_dict_from_hf, state_dict_to_hf)
from .patch import ARCHITECTURES, is_patched, masked_capacity, masked_rows_loss, patch, unpatch

__all__ = [
    # checkpoints
    "BIN_NAME", "CONFIG_NAME", "WEIGHTS_NAME", "CheckpointError", "check_output_dir", "classifier_config_to_hf",
    "config_from_hf", "config_to_hf", "load_hf", "load_hf_encoder", "read_hf_config", "read_hf_weights", "save_hf",
    "save_hf_classifier", "save_hf_tokenizer", "state_dict_from_hf", "state_dict_to_hf",
    # the transformers drop-in
    "ARCHITECTURES", "FastMLMUnsupported", "SlidingWindowMask", "fastmlm_attention", "fastmlm_mask", "is_patched",
    "is_registered", "masked_capacity", "masked_rows_loss", "patch", "register", "unpatch",
]
