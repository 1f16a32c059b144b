"""Targeted negative training (TNT; Zhang, Ranganath, Tafvizi, TMLR 2024).

Goal: the minimal change of an old model p_o that stops an unwanted behaviour,

    p_new(s | c) ∝ p_o(s | c) 1[s shows no unwanted behaviour],

learned token by token from annotated generations of the old model itself.

* annotations (:mod:`lmppl.tnt.annotations`): :func:`from_pairs` (negative/corrected
  pairs, modes ``"first"``, ``"diff"``, ``"full"``) and :func:`from_detector` (token ids
  or a token-level detector) → :class:`Annotations` (mask and padding mask ``[B, T]``);
* the per-token target (:mod:`lmppl.tnt.target`): :func:`log_p_new`;
* losses (:mod:`lmppl.tnt.losses`): ``tnff``, ``tnrr``, ``tnrf``, ``tnfll``, ``tnrll`` and
  the baselines ``nl``, ``ul``; :func:`make_loss` gives ``loss(params, batch)``;
* training: :func:`train` ``-> (lm_new, history)``; :func:`save_params` /
  :func:`load_params` / :func:`with_params` for the updated model;
* the exact view (:mod:`lmppl.tnt.exact`): :func:`minimal_update_program` (sample it with
  ``lmppl.infer.SMC`` or ``Exact``) and :func:`estimate_minimal_update` (log Z =
  log P_o(no unwanted), prevalence);
* metrics (:mod:`lmppl.tnt.metrics`): :func:`prevalence`, :func:`bleu_to_old`,
  :func:`corpus_bleu`.
"""

from lmppl.tnt import annotations, losses, metrics
from lmppl.tnt.annotations import Annotations, from_detector, from_pairs, valid_mask
from lmppl.tnt.batch import TNTBatch, old_log_probs, sequence_log_probs
from lmppl.tnt.exact import MinimalUpdate, estimate_minimal_update, minimal_update_program
from lmppl.tnt.losses import LOSSES, TNTLoss, batch_loss, get_loss, make_loss
from lmppl.tnt.metrics import bleu_to_old, contains_unwanted, corpus_bleu, prevalence
from lmppl.tnt.params import load_params, save_params, with_params
from lmppl.tnt.target import log_p_new, smoothed_log_p_new
from lmppl.tnt.training import build_dataset, train

__all__ = [
    "LOSSES",
    "Annotations",
    "MinimalUpdate",
    "TNTBatch",
    "TNTLoss",
    "annotations",
    "batch_loss",
    "bleu_to_old",
    "build_dataset",
    "contains_unwanted",
    "corpus_bleu",
    "estimate_minimal_update",
    "from_detector",
    "from_pairs",
    "get_loss",
    "load_params",
    "log_p_new",
    "losses",
    "make_loss",
    "metrics",
    "minimal_update_program",
    "old_log_probs",
    "prevalence",
    "save_params",
    "sequence_log_probs",
    "smoothed_log_p_new",
    "train",
    "valid_mask",
    "with_params",
]
